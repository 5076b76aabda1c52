"""How ``anomatune watch`` reads its folder, where its inspections go and how it publishes them (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import Settings, setting

AFTER = ("move", "keep")
MQTT_PASSWORD_ENV = "ANOMATUNE_MQTT_PASSWORD"


@dataclass(frozen=True)
class WatchSettings(Settings):
    """The hot folder: which files are taken, when they are complete, and where they go once scored."""

    section = "watch"
    folder: str | None = setting(
        None, "Folder the camera writes images into (its own files only, not its subfolders).", flag="in", metavar="DIR"
    )
    after: str = setting(
        "move",
        "What happens to an image once its result is stored: move (into DIR/done or DIR/failed) or keep (left in "
        "place; the store still scores each file once).",
        choices=AFTER,
    )
    settle: float = setting(
        1.0,
        "Seconds a file's size and modification time must stay unchanged before it is read (a camera still writing "
        "is waited for; files named .*, *.tmp or *.part are never read).",
        interval="[0, 3600]",
    )
    poll: bool = setting(
        False, "Poll the folder instead of listening to file events (network shares, where events do not arrive)."
    )
    interval: float = setting(
        1.0, "Seconds between two looks at the folder (and the longest wait without events).", interval="(0, 3600]"
    )
    batch: int = setting(16, "Images scored in one forward pass at most (a burst is taken in batches).", interval="[1, 1024]")
    overlays: bool = setting(True, "Write each image's heatmap overlay (its path goes into the store and the message).")
    keep_days: float | None = setting(
        None,
        "Days the scored images (done/, failed/) and overlays are kept; older ones are deleted, their rows stay; "
        "default: kept for ever.",
        interval="(0, 100000]",
    )
    keep_gb: float | None = setting(
        None,
        "Gigabytes the scored images and overlays may take at most; the oldest are deleted beyond it, their rows stay; "
        "default: no limit.",
        interval="(0, 1000000]",
    )
    once: bool = setting(False, "Score what is in the folder (waiting for files to settle), then stop.")


@dataclass(frozen=True)
class MqttSettings(Settings):
    """Where the verdicts are published: one message per inspection, a retained status per model."""

    section = "mqtt"
    flag_prefix = "mqtt-"
    url: str | None = setting(
        None,
        "Broker, as mqtt://[user[:password]@]host[:port] or mqtts:// (TLS); default: no messages.",
        flag="mqtt",
        metavar="URL",
    )
    topic: str = setting("anomatune", "Topic prefix: PREFIX/STATION/MODEL/inspection and PREFIX/STATION/MODEL/status.")
    qos: int = setting(1, "Quality of service: 1 (at least once; queued through a broker restart) or 0, 2.", choices=(0, 1, 2))
    ca: str | None = setting(None, "CA certificate file for TLS (mqtts://); default: the system's.", metavar="FILE")
    password: str | None = setting(
        None, f"Broker password when not in the URL; default: the {MQTT_PASSWORD_ENV} environment variable.", metavar="PASSWORD"
    )
    client_id: str | None = setting(
        None, "MQTT client id (a persistent session at the broker); default: anomatune-STATION.", metavar="ID"
    )
