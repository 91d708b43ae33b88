"""Which JPEG decoder the tests expect on this machine.

The region decoder (the ``_resnet_jpeg`` extension) is optional: an install without a C compiler
skips it and decodes through Pillow. Where the compiler setuptools uses exists, the extension
must have been built and must load, and the tests say so.
"""

import shutil
import sysconfig

HAVE_COMPILER = shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) is not None
# How resnet_core.jpeg.status() starts: the bench, selfcheck and the runs' jpeg_decoder tag.
EXPECTED_DECODER = "libjpeg-turbo region decoding (" if HAVE_COMPILER else "Pillow ("
