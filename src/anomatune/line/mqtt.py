"""Verdicts out over MQTT (paho-mqtt), delivered through broker restarts and through our own crashes.

The store is the outbox: an inspection's message is sent from its row, and the row is marked published only once
the broker acknowledged it (QoS 1 or 2). A broker that goes away is reconnected to (paho's automatic reconnect,
1 to 30 s apart); what was not acknowledged is sent again from the store, oldest first, so a verdict is delivered
at least once, even when anomatune itself was killed in between. Each model also has a retained status message
(version, threshold, drift, online) and a will that marks the station offline when its connection drops.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import AnomatuneError
from ..store import InspectionStore
from .settings import MQTT_PASSWORD_ENV, MqttSettings

log = logging.getLogger(__name__)

MESSAGE_FIELDS = (
    "id",
    "time",
    "station",
    "model",
    "version",
    "model_id",
    "file_name",
    "score",
    "normalized",
    "false_alarm_rate",
    "threshold",
    "verdict",
    "error",
    "overlay_path",
)
ACK_TIMEOUT = 10.0  # seconds a message waits for the broker's acknowledgement before the outbox tries again later


def inspection_message(row: dict[str, Any]) -> bytes:
    """The JSON payload of an inspection: what a PLC, MES or dashboard reads."""
    return json.dumps({key: row.get(key) for key in MESSAGE_FIELDS}, separators=(",", ":")).encode()


def topic(settings: MqttSettings, *parts: str) -> str:
    """``PREFIX/part/part/...``."""
    return "/".join(part.strip("/") for part in (settings.topic, *parts))


class Publisher:
    """Sends the store's unpublished inspections to the broker of ``settings.url`` from a background thread."""

    def __init__(self, settings: MqttSettings, store: InspectionStore):
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:
            raise AnomatuneError("--mqtt needs paho-mqtt: pip install 'anomatune[line]'") from exc
        self.settings, self.store = settings, store
        url = urlsplit(settings.url)
        if url.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise AnomatuneError(f"--mqtt {settings.url!r}: use mqtt://host[:port] or mqtts://host[:port]")
        tls = url.scheme in ("mqtts", "ssl")
        self.host, self.port = url.hostname or "localhost", url.port or (8883 if tls else 1883)
        client_id = settings.client_id or f"anomatune-{store.station}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        password = unquote(url.password) if url.password else settings.password or os.environ.get(MQTT_PASSWORD_ENV)
        if url.username:
            self.client.username_pw_set(unquote(url.username), password)
        if tls:
            self.client.tls_set(ca_certs=settings.ca, cert_reqs=ssl.CERT_REQUIRED)
        self.client.reconnect_delay_set(1, 30)
        self.client.max_queued_messages_set(10_000)
        self.statuses: dict[str, dict[str, Any]] = {}
        self.station_topic = topic(settings, store.station, "status")
        self.client.will_set(self.station_topic, json.dumps({"online": False}), qos=1, retain=True)
        self.client.on_connect = self._connected
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="anomatune-mqtt", daemon=True)

    def _status_topic(self, model: str) -> str:
        return topic(self.settings, self.store.station, model, "status")

    def _connected(self, client, _userdata, _flags, reason, _properties) -> None:
        if reason.is_failure:
            log.error("MQTT broker %s:%d refused the connection: %s", self.host, self.port, reason)
            return
        log.info("MQTT: connected to %s:%d", self.host, self.port)
        client.publish(self.station_topic, json.dumps({"online": True}), qos=1, retain=True)
        for model, status in self.statuses.items():  # retained: a dashboard that subscribes later still sees it
            client.publish(self._status_topic(model), json.dumps(status | {"online": True}), qos=1, retain=True)
        self._wake.set()

    def start(self) -> Publisher:
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        self._thread.start()
        return self

    def stop(self, flush_seconds: float = 5.0) -> None:
        """Send what can be sent within ``flush_seconds``, mark the models offline, disconnect."""
        self._stop.set()
        self._wake.set()
        self._thread.join(flush_seconds + ACK_TIMEOUT)
        for model, status in self.statuses.items():
            self.client.publish(self._status_topic(model), json.dumps(status | {"online": False}), qos=1, retain=True)
        self.client.publish(self.station_topic, json.dumps({"online": False}), qos=1, retain=True)
        self.client.disconnect()
        self.client.loop_stop()

    def notify(self) -> None:
        """New inspections are in the store: send them now rather than at the next look."""
        self._wake.set()

    def status(self, model: str, **status: Any) -> None:
        """The model's retained status (version, threshold, drift, ...), sent now and at every reconnection."""
        self.statuses[model] = status
        if self.client.is_connected():
            self.client.publish(self._status_topic(model), json.dumps(status | {"online": True}), qos=1, retain=True)

    def _run(self) -> None:
        while True:
            self._wake.wait(5.0)
            self._wake.clear()
            if self.client.is_connected():
                self._send_outbox(self._stop.is_set)
            if self._stop.is_set():
                return

    def _send_outbox(self, stopping: Callable[[], bool]) -> None:
        """Every unpublished inspection, oldest first, each marked once the broker acknowledged it."""
        while self.client.is_connected():
            rows = self.store.unpublished(limit=100, station=self.store.station)
            if not rows:
                return
            sent = []
            for row in rows:
                info = self.client.publish(
                    topic(self.settings, row["station"], row["model"], "inspection"),
                    inspection_message(row),
                    qos=self.settings.qos,
                )
                sent.append((row["id"], info))
            acknowledged = []
            for inspection_id, info in sent:
                try:
                    info.wait_for_publish(ACK_TIMEOUT)
                except (RuntimeError, ValueError):  # the connection went while waiting: sent again later
                    break
                if not info.is_published():
                    break
                acknowledged.append(inspection_id)
            self.store.mark_published(acknowledged)
            if len(acknowledged) < len(sent):
                return
            if stopping() and not self.store.unpublished(limit=1, station=self.store.station):
                return
