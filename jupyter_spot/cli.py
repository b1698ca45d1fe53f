"""``jupyter spot …``: one jupyter_core application with a subcommand per task."""

from __future__ import annotations

from jupyter_core.application import JupyterApp

from ._version import __version__


class SpotCLI(JupyterApp):
    name = "jupyter-spot"
    version = __version__
    description = "Jupyter sessions that survive spot-instance interruptions."
    subcommands = {
        "list": ("jupyter_spot.server.cli_apps.ListApp", "List sessions in the store and whether they were interrupted."),
        "show": ("jupyter_spot.server.cli_apps.ShowApp", "Show a snapshot: variables, sizes, what was skipped."),
        "gc": ("jupyter_spot.server.cli_apps.GCApp", "Keep the newest N snapshots per session; delete unused blobs."),
        "key": ("jupyter_spot.server.cli_apps.KeyApp", "Show the signing keys; `key rotate` makes a new KMS-wrapped key."),
        "doctor": ("jupyter_spot.server.cli_apps.DoctorApp", "Check the store, signing key and notice sources."),
        "enable": (
            "jupyter_spot.kernel.enable.EnableApp",
            "`enable --kernel`: load jupyter_spot in every IPython kernel (VS Code, nbclient, console…).",
        ),
        "disable": ("jupyter_spot.kernel.enable.DisableApp", "`disable --kernel`: undo `enable --kernel`."),
        "run": ("jupyter_spot.run.RunApp", "Run a notebook, snapshotting after each cell; resume after an interruption."),
        "simulate": (
            "jupyter_spot.notice.simulator.SimulateApp",
            "Serve a cloud's metadata protocol on 127.0.0.1 and fire an interruption notice.",
        ),
    }

    def start(self) -> None:
        if self.subapp is None:
            self.print_help()
            self.exit(0 if self.subcommand is None else 1)
        super().start()


main = launch_new_instance = SpotCLI.launch_instance
