"""benchmarks/miranda_structure.py: the Poincaré mapping and the TF-IDF cluster themes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.miranda_structure import cluster_themes, hyperboloid_to_poincare, main  # noqa: E402


def test_hyperboloid_points_map_into_the_disk_preserving_distance_from_the_origin():
    r = np.array([0.0, 0.5, 2.0, 12.0])
    disk = hyperboloid_to_poincare(np.stack([np.sinh(r), np.zeros_like(r)], -1))
    # a point at hyperbolic distance r from the origin sits at Euclidean radius tanh(r / 2)
    np.testing.assert_allclose(disk[:, 0], np.tanh(r / 2), rtol=1e-12)
    np.testing.assert_array_equal(disk[:, 1], 0.0)
    far = hyperboloid_to_poincare(np.array([[-300.0, 400.0]]))
    assert np.linalg.norm(far) < 1.0
    np.testing.assert_allclose(far[0] / np.linalg.norm(far), [-0.6, 0.8])  # direction kept


def test_cluster_theme_is_the_drug_that_sets_a_cluster_apart_not_the_routine_one():
    # drug 0 is in every set (routine); cluster 0 is about drug 1, cluster 1 about drug 2 (+ drug 3 once)
    sets = np.array(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [1, 0, 1, 0],
            [1, 0, 1, 1],
            [1, 0, 1, 0],
        ]
    )
    labels = np.array([0, 0, 0, 1, 1, 1])
    themes = cluster_themes(sets, labels, top=2)
    assert themes[0] == [1, 0]  # drug 1 first; drug 2 and 3 never occur in cluster 0
    assert themes[1][0] == 2
    assert 1 not in themes[1]
    assert cluster_themes(sets, labels, top=1) == {0: [1], 1: [2]}


def test_cluster_themes_skip_drugs_absent_from_a_cluster():
    sets = np.array([[1, 0, 0], [0, 1, 0]])
    assert cluster_themes(sets, np.array([0, 1]), top=3) == {0: [0], 1: [1]}


def test_checkpoint_without_a_name_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), "--checkpoint", "baseline=a.ckpt", "--checkpoint", "b.ckpt"])
    assert exit_info.value.code == 2
    assert "--checkpoint takes name=path" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
