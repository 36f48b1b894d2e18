"""mino-jupyter: run notebook cells' shell commands in hardened Podman containers.

Load it in IPython or Jupyter with ``%load_ext mino_jupyter``.
"""

__version__ = "0.1.0"


def load_ipython_extension(ipython):
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython):
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)
