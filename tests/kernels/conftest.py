"""Kernel tests run the Triton kernels under the interpreter on CPU tensors: the variable must be set
before triton (or sapiens2.kernels) is first imported, so it is set here at import time. The
compile gate test strips it again for its own subprocess."""

import os

os.environ["TRITON_INTERPRET"] = "1"
