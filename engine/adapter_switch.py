"""Which adapter answers, changed while the app runs: follow the newest, pin one, or use the base model.

The choice is kept in ``ADAPTER_DIR/app_adapter_choice.json`` (``{"mode": "follow" | "pinned" | "base",
"adapter": NAME}``), so it survives a restart; no file means follow. Following looks at ADAPTER_DIR every
ADAPTER_POLL_S seconds and swaps in a newer complete adapter trained on CHAT_MODEL, including one written by
``python -m finetune train`` outside the app.

A swap waits for the requests in flight: each answer holds ``gate.shared()`` from the moment it reads which
adapter answers until its generation ends, and a swap holds ``gate.exclusive()``, which waits for them and keeps
new ones waiting until it is done. So an answer records the adapter it really ran on, and a request in flight
finishes on the adapter it started with.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from errors import UserError
from finetune import runs
from finetune.adapters import (
    AdapterEntry,
    adapter_folder,
    archive_adapter,
    delete_adapter,
    list_adapters,
    rename_adapter,
)
from finetune.output_dir import read_json, write_json
from locks import SharedExclusive
from settings import Settings

log = logging.getLogger(__name__)

CHOICE_NAME = "app_adapter_choice.json"
FOLLOW, PINNED, BASE = "follow", "pinned", "base"


class AdapterError(UserError):
    """An adapter cannot be chosen or loaded; the message names it and says what to do."""


@dataclass(frozen=True)
class AdapterChoice:
    mode: str = FOLLOW
    adapter: str | None = None  # the pinned adapter's folder name

    def describe(self) -> str:
        return {FOLLOW: "following the newest", BASE: "chosen", PINNED: "pinned"}[self.mode]


def choice_path(settings: Settings) -> Path:
    return Path(settings.adapter_dir) / CHOICE_NAME


def load_choice(settings: Settings) -> AdapterChoice:
    data = read_json(choice_path(settings))
    if data.get("mode") == PINNED and isinstance(data.get("adapter"), str):
        return AdapterChoice(PINNED, data["adapter"])
    return AdapterChoice(BASE) if data.get("mode") == BASE else AdapterChoice()


def save_choice(settings: Settings, choice: AdapterChoice) -> None:
    path = choice_path(settings)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"mode": choice.mode, "adapter": choice.adapter})
    except OSError as e:
        raise AdapterError(f"cannot save the adapter choice to {path} ({e.strerror or e}); it holds until the app "
                           "restarts. Make ADAPTER_DIR writable to keep it.") from None


def chosen_adapter(settings: Settings, choice: AdapterChoice | None = None) -> AdapterEntry | None:
    """The adapter ``choice`` (by default the saved one) names: None for the base model."""
    choice = choice or load_choice(settings)
    if choice.mode == BASE:
        return None
    adapters = list_adapters(settings.adapter_dir, settings.chat_model)
    if choice.mode == PINNED:
        pinned = next((a for a in adapters if a.name == choice.adapter), None)
        if pinned is not None and pinned.usable:
            return pinned
        why = pinned.reason if pinned else "it is no longer in ADAPTER_DIR"
        log.warning("the pinned adapter %s cannot be used (%s); following the newest instead", choice.adapter, why)
    for adapter in adapters:
        if adapter.usable:
            return adapter
        log.info("adapter %s not loaded: %s", adapter.path, adapter.reason)
    return None


class AdapterSwitch:
    """The adapter choice of one runtime: list, pin, use the base, follow the newest (in a background thread).

    A runtime that can swap has ``activate(adapter: AdapterEntry | None)`` and ``active_adapter``; it is
    attached once it has loaded (``Assistant.runtime`` does that).
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        # Answers hold it shared; a swap takes it alone, between them (waiting swaps go first).
        self.gate = SharedExclusive()
        self.choice = load_choice(settings)
        self.runtime = None
        self._swapping = threading.Lock()  # one swap at a time: choose and follow never interleave
        self._failed: set[tuple[str, float]] = set()  # versions following could not load; not retried each poll
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None

    def attach(self, runtime) -> None:
        """Start switching ``runtime``. One that loaded without an adapter (an OpenAI-compatible server starts
        on OPENAI_MODEL) gets the saved choice's adapter now."""
        self.runtime = runtime
        if not hasattr(runtime, "activate") or runtime.active_adapter is not None or self.choice.mode == BASE:
            return
        wanted = chosen_adapter(self.settings, self.choice)
        if wanted is not None:
            try:
                with self._swapping:
                    self._swap(wanted)
            except AdapterError as e:
                log.error("cannot load adapter %s; answering without it: %s", wanted.name, e)

    def adapters(self) -> list[AdapterEntry]:
        return list_adapters(self.settings.adapter_dir, self.settings.chat_model)

    @property
    def active(self) -> AdapterEntry | None:
        return getattr(self.runtime, "active_adapter", None)

    def use_adapter(self, name: str) -> str:
        """Pin the adapter named ``name`` (its folder name) and swap it in; a note on what happened."""
        adapter = next((a for a in self.adapters() if a.name == name), None)
        if adapter is None:
            raise AdapterError(f"no adapter {name!r} in {self.settings.adapter_dir}; pick one from the list")
        if not adapter.usable:
            raise AdapterError(f"adapter {name} cannot be used: {adapter.reason}")
        return self._choose(AdapterChoice(PINNED, name), adapter)

    def use_base(self) -> str:
        return self._choose(AdapterChoice(BASE), None)

    def follow_newest(self) -> str:
        return self._choose(AdapterChoice(), chosen_adapter(self.settings, AdapterChoice()))

    def _choose(self, choice: AdapterChoice, adapter: AdapterEntry | None) -> str:
        with self._swapping:
            self._swap(adapter)
            self.choice = choice
        note = f"Now answering with {adapter.name if adapter else 'the base model'} ({choice.describe()})."
        try:
            save_choice(self.settings, choice)
        except AdapterError as e:
            note += f" {e}"
        return note

    def _swap(self, adapter: AdapterEntry | None) -> None:
        runtime = self.runtime
        if runtime is None:
            raise AdapterError("the model has not loaded yet; choose again once it is ready")
        if not hasattr(runtime, "activate"):
            raise AdapterError(f"this model runtime ({type(runtime).__name__}) cannot swap adapters")
        current = self.active
        if (current.version if current else None) == (adapter.version if adapter else None):
            return
        with self.gate.exclusive():
            runtime.activate(adapter)

    def _changeable(self, name: str) -> Path:
        """The folder of ``name``, refused while it answers or a training run writes it."""
        folder = adapter_folder(self.settings.adapter_dir, name)
        active = self.active
        if (active is not None and active.name == name) or (self.choice.mode == PINNED and self.choice.adapter == name):
            raise AdapterError(f"{name} is the adapter answering; choose another (or the base model) first")
        record = runs.read_run(folder)
        if record is not None and record.status not in runs.ENDED:
            raise AdapterError(f"a training run is writing {name}; wait for it or cancel it in the Train tab")
        return folder

    def rename(self, name: str, new_name: str) -> str:
        """Give an adapter that is not answering another name (its folder's)."""
        with self._swapping:
            self._changeable(name)
            folder = rename_adapter(self.settings.adapter_dir, name, new_name)
            record = runs.read_run(folder)
            if record is not None:  # a run's record names its folder
                record.name = folder.name
                runs.write_run(folder, record)
        return f"Renamed {name} to {folder.name}."

    def delete(self, name: str) -> str:
        """Delete an adapter's folder (not the one answering), checkpoints and data with it."""
        with self._swapping:
            self._changeable(name)
            delete_adapter(self.settings.adapter_dir, name)
        return f"Deleted {name}."

    def archive(self, name: str, out_dir: Path) -> Path:
        return archive_adapter(self.settings.adapter_dir, name, out_dir)

    def poll(self) -> None:
        """One look at ADAPTER_DIR while following: swap in the newest usable adapter if it is not in use."""
        if self.runtime is None or self.choice.mode != FOLLOW:
            return
        newest = next((a for a in self.adapters() if a.usable), None)
        current = self.active
        if newest is None or (current is not None and current.version == newest.version) \
                or newest.version in self._failed:
            return
        with self._swapping:
            if self.choice.mode != FOLLOW:  # pinned while this poll looked
                return
            try:
                self._swap(newest)
            except UserError as e:
                self._failed.add(newest.version)
                log.error("cannot follow to adapter %s: %s", newest.name, e)
                return
        log.info("now answering with adapter %s (the newest in %s)", newest.name, self.settings.adapter_dir)

    def start_following(self) -> None:
        """Look at ADAPTER_DIR every ADAPTER_POLL_S seconds from now on (never when it is 0)."""
        interval = self.settings.adapter_poll_s
        if interval <= 0 or self._follower is not None:
            return

        def follow() -> None:
            while not self._stop.wait(interval):
                try:
                    self.poll()
                except Exception:  # noqa: BLE001 - a failed look must not end following for the app's life
                    log.exception("looking for a newer adapter failed; following goes on")

        self._follower = threading.Thread(target=follow, name="adapter-follower", daemon=True)
        self._follower.start()

    def stop(self) -> None:
        self._stop.set()
