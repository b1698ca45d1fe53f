"""Interruption notices: AWS, GCP and Azure metadata, SIGTERM, and a local simulator.

The sources all produce the same :class:`Notice`; a :class:`NoticeWatcher`
polls them in the background and reports each notice once.
"""

from .aws import AWSSource
from .azure import AzureSource
from .detect import cloud_sources, detect_cloud
from .gcp import GCPSource
from .model import Notice
from .signals import SignalSource
from .source import NoticeSource
from .watcher import NoticeWatcher

__all__ = [
    "AWSSource",
    "AzureSource",
    "GCPSource",
    "Notice",
    "NoticeSource",
    "NoticeWatcher",
    "SignalSource",
    "cloud_sources",
    "detect_cloud",
]
