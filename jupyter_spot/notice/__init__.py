"""Interruption notices: AWS, GCP and Azure metadata, SIGTERM, and a local simulator.

The sources all produce the same :class:`Notice`; a :class:`NoticeWatcher`
polls them in the background and reports each notice once.
"""

from .aws import AWSSource
from .azure import AzureSource
from .detect import cloud_sources, detect_cloud
from .gcp import GCPSource
from .kernel_watch import NOTICE_FILE_ENV, SERVER_WATCHES_ENV, KernelNotReady, deliver_notice_to_kernel
from .model import Notice
from .signals import SignalSource
from .source import NoticeSource
from .watcher import NoticeWatcher

__all__ = [
    "AWSSource",
    "AzureSource",
    "GCPSource",
    "KernelNotReady",
    "NOTICE_FILE_ENV",
    "SERVER_WATCHES_ENV",
    "Notice",
    "NoticeSource",
    "NoticeWatcher",
    "SignalSource",
    "cloud_sources",
    "deliver_notice_to_kernel",
    "detect_cloud",
]
