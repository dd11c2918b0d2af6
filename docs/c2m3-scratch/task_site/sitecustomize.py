"""Probe only: chapter 06's digits split replaced by an exported image task (MERGELAB_C2M3_PROBE_NPZ)."""
import os

_npz = os.environ.get("MERGELAB_C2M3_PROBE_NPZ")
if _npz:
    import numpy as np
    import torch

    import mergelab.experiments.ch06_models as m
    from mergelab.training.scratch import DigitsSplit

    def _split(test_fraction, split_seed):
        with np.load(_npz) as f:
            t = {k: torch.from_numpy(f[k]) for k in f.files}
        return DigitsSplit(t["X_train"].float(), t["y_train"].long(), t["X_test"].float(), t["y_test"].long(),
                           int(t["y_train"].max()) + 1)

    m._split = _split
