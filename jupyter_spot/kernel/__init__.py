"""What runs inside the kernel: the extension, magics, change tracking, snapshot and restore."""
