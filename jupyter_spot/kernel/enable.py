"""``jupyter spot enable --kernel``: load the kernel extension in every IPython kernel, through IPython's config.

Kernel-only clients (VS Code, PyCharm, nbclient, papermill, ``jupyter console``)
start kernels without a jupyter_server, so nothing passes ``--ext=jupyter_spot``.
IPython's own config does it for them: ``c.InteractiveShellApp.extensions`` in
an ``ipython_kernel_config.py`` that every kernel of the environment reads
(``sys.prefix/etc/ipython``) or the user's profile (``$IPYTHONDIR/profile_default``).
Kernelspecs are left alone. The lines added are fenced by markers, so enabling
twice changes nothing and ``--disable`` removes exactly what was added.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jupyter_core.application import JupyterApp, base_flags
from traitlets import Bool, Unicode

from .._version import __version__

CONFIG_FILE = "ipython_kernel_config.py"
BEGIN = "# >>> jupyter-spot >>> (added by `jupyter spot enable --kernel`; `jupyter spot disable --kernel` removes it)"
END = "# <<< jupyter-spot <<<"
BLOCK = f'{BEGIN}\nc.InteractiveShellApp.extensions.append("jupyter_spot")\n{END}\n'


def environment_config_dir() -> Path:
    """IPython's config dir for this environment: every kernel run by this Python reads it."""
    return Path(sys.prefix) / "etc" / "ipython"


def user_config_dir() -> Path:
    """The user's default IPython profile ($IPYTHONDIR honoured)."""
    from IPython.paths import get_ipython_dir

    return Path(get_ipython_dir()) / "profile_default"


def _without_block(text: str) -> tuple[str, bool]:
    """``text`` with jupyter-spot's fenced lines removed, and whether there were any."""
    start = text.find(BEGIN)
    if start < 0:
        return text, False
    end = text.find(END, start)
    if end < 0:
        raise ValueError(f"found the line {BEGIN!r} but not its closing line {END!r}: fix the file by hand")
    end += len(END)
    if text[end:end + 1] == "\n":
        end += 1
    return text[:start] + text[end:], True


def enable(config_dir: Path) -> str:
    """Add the extension to ``config_dir``'s kernel config; what happened, in one sentence."""
    path = config_dir / CONFIG_FILE
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in text:
        return f"already enabled: {path} loads jupyter_spot in every IPython kernel that reads it"
    if text and not text.endswith("\n"):
        text += "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + BLOCK, encoding="utf-8")
    verb = "added to" if text else "created"
    return f"enabled: {verb} {path}; new IPython kernels load jupyter_spot (running kernels: %load_ext jupyter_spot)"


def disable(config_dir: Path) -> str:
    """Remove what :func:`enable` added; the file is deleted only if nothing else is left in it."""
    path = config_dir / CONFIG_FILE
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    rest, found = _without_block(text)
    if not found:
        return f"not enabled in {path}: nothing to change"
    if rest.strip():
        path.write_text(rest, encoding="utf-8")
        return f"disabled: removed jupyter-spot's lines from {path}"
    path.unlink()
    return f"disabled: deleted {path} (it held only jupyter-spot's lines)"


class EnableApp(JupyterApp):
    name = "jupyter-spot-enable"
    version = __version__
    description = (
        "jupyter spot enable --kernel [--user | --config-dir=DIR] [--disable]: load jupyter_spot in every IPython "
        "kernel of this environment (sys.prefix/etc/ipython/ipython_kernel_config.py), for kernels started "
        "without a Jupyter server (VS Code, PyCharm, nbclient, papermill, jupyter console)."
    )
    kernel = Bool(False, help="Enable the kernel extension for kernels started without a server.").tag(config=True)
    user = Bool(False, help="Write to the user's IPython profile ($IPYTHONDIR/profile_default).").tag(config=True)
    config_dir = Unicode("", help="Write to this IPython config dir instead.").tag(config=True)
    disabling = Bool(False, help="Remove what enable added.").tag(config=True)
    aliases = {"config-dir": "EnableApp.config_dir"}
    flags = {
        **base_flags,
        "kernel": ({"EnableApp": {"kernel": True}}, "Load jupyter_spot in IPython kernels started without a server."),
        "user": ({"EnableApp": {"user": True}}, "The user's IPython profile, not the environment's config."),
        "sys-prefix": ({"EnableApp": {"user": False}}, "The environment's IPython config (the default)."),
        "disable": ({"EnableApp": {"disabling": True}}, "Remove what `enable --kernel` added."),
    }

    def target(self) -> Path:
        if self.config_dir:
            return Path(self.config_dir).expanduser()
        return user_config_dir() if self.user else environment_config_dir()

    def start(self) -> None:
        if not self.kernel:
            print(
                f"jupyter spot {self.name.rsplit('-', 1)[-1]}: say --kernel (the server extension is enabled by "
                "installing the package; this command is for kernels started without a server)",
                file=sys.stderr,
            )
            self.exit(1)
        try:
            print(disable(self.target()) if self.disabling else enable(self.target()))
        except (OSError, ValueError) as error:
            print(f"jupyter spot {self.name.rsplit('-', 1)[-1]}: {error}", file=sys.stderr)
            self.exit(1)


class DisableApp(EnableApp):
    name = "jupyter-spot-disable"
    description = "jupyter spot disable --kernel [--user | --config-dir=DIR]: undo `jupyter spot enable --kernel`."
    disabling = Bool(True, help="Remove what enable added.").tag(config=True)
