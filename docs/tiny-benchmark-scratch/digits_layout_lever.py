"""Session 11 of the tiny-benchmark design (issue 16): the digits glyph aligned with the patch grid.

Digits is the task that holds `tiny` back everywhere: its expert reaches .365 (the others .72-1.0), its
linear probe .28, MASS routes only .22 of its images to it. Its 24x24 glyph (scikit-learn's 8x8 digit
upscaled 3x) sits at a random offset of 0-8 pixels, so the patch grid (8 pixels) cuts it at 64 phases,
and 2000 training images cover each phase thinly (session 3: centring to +-1 pixel lifted the expert by
.17 on the encoder of that time). MNIST in the public benchmark is centred and upscaled 8x, so a patch sees
a fixed part of the digit. `aligned` upscales the glyph 4x to the whole 32x32 image: each 8-pixel patch
holds exactly 2x2 of the digit's pixels, at one phase; background, colour and noise are drawn as before.
The canonical heads render the same layout. In session 11 this script replaced the digits generator and the
canonical digits images in its process, moved `GENERATOR_VERSION` (so every key that depends on the data differed from
the package's) and ran `head_lever.py` (chapter 00's seed study at one pretraining seed, pretraining on the new data);
`mass_check.py` then measured MASS on the same folder. Session 11 adopted the layout: since generator version 6 the
package draws digits this way (`data._draw_digits`, `data.DIGIT_SCALE`), so the script no longer carries its own copy
of the generator (the session's version: `git show 47850f6:docs/tiny-benchmark-scratch/digits_layout_lever.py`); it
only moves `GENERATOR_VERSION` to 1006, the key of session 11's folders, and runs `head_lever.py`.

usage: MERGELAB_DATA_DIR=<empty dir> MERGELAB_PRETRAIN=1 python docs/tiny-benchmark-scratch/digits_layout_lever.py PRETRAIN_SEED OUT.json
"""

import runpy
import sys
from pathlib import Path

from mergelab.benchmarks.tiny import data as td

td.GENERATOR_VERSION = 1000 + td.GENERATOR_VERSION  # session 11's keys: the aligned digits under another key

pre_seed, out = sys.argv[1], sys.argv[2]
here = Path(__file__).parent
sys.argv = [str(here / "head_lever.py"), pre_seed, "{}", "{}", out]
runpy.run_path(str(here / "head_lever.py"), run_name="__main__")
