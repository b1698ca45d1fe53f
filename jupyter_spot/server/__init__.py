"""jupyter-spot's jupyter_server extension: REST API, notice watcher, kernel launch settings, restore.

Imported only by jupyter_server (through ``_jupyter_server_extension_points``)
and the ``jupyter spot`` CLI, never by kernels.
"""
