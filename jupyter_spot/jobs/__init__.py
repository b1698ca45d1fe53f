"""Heavy cells as jobs that outlive the kernel (``%%spot_job``).

A job is a cell run by a detached process (``runner``) from what the store
holds: its source and the inputs it reads, signed like a snapshot. Its outputs
come back into the namespace by name once it finishes (``watch``); after an
interruption the restored session collects, watches or re-runs it, and
``checkpoint`` lets a re-run resume instead of starting over.
"""
