"""Storage queues on Azurite: the encoding the Functions host expects, the size limit, settings."""

import base64
import json
import uuid

import pytest
from azure.storage.queue import QueueClient

from shared.config import Settings
from shared.errors import Misconfigured
from shared.queues import (
    MAX_MESSAGE_BYTES,
    InProcessQueue,
    encoded_size,
    host_message_encoding,
    poison_queue,
    storage_queue,
)


def _name() -> str:
    return "q" + uuid.uuid4().hex[:12]


def test_messages_reach_the_queue_in_the_encoding_host_json_names(queue_settings):
    settings = Settings.from_values(queue_settings)
    name = _name()
    queue = storage_queue(settings, name)
    assert queue.encoding == host_message_encoding() == "base64"
    queue.send(json.dumps({"chunk": 1}))

    # Read it raw, as the host does before decoding with host.json's messageEncoding.
    raw = QueueClient.from_connection_string(queue_settings["QUEUE_STORAGE"], name)
    (message,) = list(raw.receive_messages())
    assert json.loads(base64.b64decode(message.content)) == {"chunk": 1}


def test_the_queue_reads_back_what_it_sent(queue_settings):
    queue = storage_queue(Settings.from_values(queue_settings), _name())
    queue.send("first")
    queue.send("later", delay_seconds=60)
    messages = queue.receive()
    assert [m.content for m in messages] == ["first"]
    queue.delete(messages[0])
    assert queue.receive() == []


def test_without_base64_the_message_is_sent_as_it_is(queue_settings):
    name = _name()
    storage_queue(Settings.from_values(queue_settings), name, encoding="none").send("plain")
    (message,) = list(QueueClient.from_connection_string(queue_settings["QUEUE_STORAGE"], name).receive_messages())
    assert message.content == "plain"


def test_a_message_over_64_kib_once_encoded_is_refused_before_sending(queue_settings):
    queue = storage_queue(Settings.from_values(queue_settings), _name())
    fits = "x" * (MAX_MESSAGE_BYTES * 3 // 4)
    assert encoded_size(fits, "base64") == MAX_MESSAGE_BYTES
    queue.send(fits)
    with pytest.raises(Misconfigured, match="64 KiB"):
        queue.send(fits + "x")
    with pytest.raises(Misconfigured, match="64 KiB"):
        InProcessQueue("q").send("x" * (MAX_MESSAGE_BYTES + 1))


def test_queue_settings_are_checked():
    with pytest.raises(Misconfigured, match="QUEUE_STORAGE"):
        storage_queue(Settings(), "q")
    with pytest.raises(Misconfigured, match="not a valid connection string"):
        storage_queue(Settings.from_values({"QUEUE_STORAGE": "nonsense"}), "q")
    assert not Settings().storage_queues
    uri = Settings.from_values({"QUEUE_STORAGE__queueServiceUri": "https://acct.queue.core.windows.net/"})
    assert uri.storage_queues
    from azure.core.credentials import AccessToken

    class NoToken:
        def get_token(self, *scopes, **kwargs):
            return AccessToken("unused", 0)

    queue = storage_queue(uri, "jobs", credential=NoToken())
    assert queue.name == "jobs"
    assert queue._client.url.startswith("https://acct.queue.core.windows.net/jobs")


def test_host_json_encoding_is_read_and_checked(tmp_path):
    host = tmp_path / "host.json"
    host.write_text(json.dumps({"version": "2.0"}))
    assert host_message_encoding(host) == "base64"
    host.write_text(json.dumps({"extensions": {"queues": {"messageEncoding": "none"}}}))
    assert host_message_encoding(host) == "none"
    host.write_text(json.dumps({"extensions": {"queues": {"messageEncoding": "utf8"}}}))
    with pytest.raises(Misconfigured, match="messageEncoding"):
        host_message_encoding(host)


def test_the_in_process_queue_is_first_in_first_out():
    queue = InProcessQueue("q")
    queue.send("a")
    queue.send("b")
    assert [queue.take(), queue.take(), queue.take()] == ["a", "b", None]
    assert poison_queue("batch-chunks") == "batch-chunks-poison"


def test_the_in_process_worker_delivers_again_after_a_failure_and_then_to_poison():
    queue = InProcessQueue("work", max_dequeue_count=3, retry_seconds=0.001)
    seen: list[str] = []
    poisoned: list[str] = []

    def handler(text: str) -> None:
        seen.append(text)
        if text == "never" or (text == "twice" and seen.count("twice") < 2):
            raise RuntimeError("not yet")

    queue.serve(handler, poisoned.append)
    queue.send("once")
    queue.send("twice")
    queue.send("never")
    queue.wait_idle()
    assert seen.count("once") == 1 and seen.count("twice") == 2 and seen.count("never") == 3
    assert poisoned == ["never"]
    queue.send("later", delay_seconds=1)
    queue.wait_idle()
    assert seen[-1] == "later"
    queue.close()
    queue.close()  # twice: nothing left to stop


def test_a_queue_without_a_worker_keeps_its_messages_until_taken():
    queue = InProcessQueue("held")
    queue.send("kept")
    queue.close()
    assert queue.take() == "kept"
