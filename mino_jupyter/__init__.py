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


def panel():
    """The mino panel (network picker, sessions, logs) for this kernel; load the extension first."""
    from IPython import get_ipython

    from .errors import MinoError
    from .magics import current_manager
    from .widgets import Panel

    manager = current_manager(get_ipython())
    if manager is None:
        raise MinoError("the mino extension is not loaded in this kernel", "run %load_ext mino_jupyter first")
    return Panel(manager)
