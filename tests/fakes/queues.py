"""A queue whose Storage cannot be reached: every send fails as the Storage queue adapter's would."""

from shared.errors import BackendUnavailable
from shared.queues import InProcessQueue


class QueueDown(InProcessQueue):
    """An in-process queue that refuses every message with the 503 BackendUnavailable that shared/queues.py
    gives when Queue Storage cannot be reached."""

    def send(self, text, delay_seconds=0):
        raise BackendUnavailable("Queue Storage is unreachable: ServiceRequestError")
