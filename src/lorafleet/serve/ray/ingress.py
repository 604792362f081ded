"""What the Ray ingress adds for the features a replica cannot resolve alone: MoLEs and
`class_choices` forwarded to replicas by reference, ties / dare merges and hub adapters written
once by the ingress into the shared adapters directory for every replica to read. No Ray here:
the fleet hands in the calls that reach a replica."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lorafleet.adapters import Adapter, write_adapter
from lorafleet.adapters.format import CONFIG_NAME
from lorafleet.errors import LorafleetError
from lorafleet.serve.api.classify import Classifier
from lorafleet.serve.api.injected import MoleModels
from lorafleet.serve.backend import AdapterSpec
from lorafleet.serve.merged import VIRTUAL_PREFIX, is_virtual
from lorafleet.serve.ray.wire import MoleRef, adapter_names
from lorafleet.serve.sequence import Mixture, resolve_adapter

log = logging.getLogger(__name__)
# Hidden sub-directories of the shared adapters directory (a dot name is never an entry of it,
# so neither is listed, scanned or served by its directory name): merged adapters by their
# recipe's hash, hub snapshots by repository and commit. Safe to delete while no fleet runs.
MERGED_DIR = ".lorafleet-merged"
HUB_DIR = ".lorafleet-hub"
HUB_WAIT_S = 600.0  # the longest a request waits for the ingress to fetch its hub adapter


class RoutedMoles:
    """MoleModels at the ingress. `catalog` is the ingress's own MoleCatalog over its registry
    (each MoLE checked there as `lorafleet serve` checks it: /v1/models, the admin listing, a
    broken MoLE's 400, a mask's check); `spec(name, mask)` is a Mixture of the MoLE's experts
    whose gate is a MoleRef, so the replica runs its own gates (ReplicaCore.engine_spec)."""

    def __init__(self, catalog: MoleModels):
        self.catalog = catalog

    def __contains__(self, name: str) -> bool:
        return name in self.catalog

    def names(self) -> list[str]:
        return self.catalog.names()

    def experts(self, name: str) -> list[str]:
        return self.catalog.experts(name)

    def spec(self, name: str, mask: Sequence[str] = ()) -> Mixture:
        mixture = self.catalog.spec(name, mask)  # a mask naming no expert: its one-line error
        return Mixture(mixture.entries, gate=MoleRef(name, tuple(sorted(set(mask)))), name=name)


class RoutedClassifier:
    """The Classifier at the ingress: `problem` is `local`'s (the ingress's own classifier,
    asked only whether the adapter is calibrated: a file check, no model), `probs` runs on a
    replica, which has the model: `ask(adapter, prompt, choices)` (one-line LorafleetError)."""

    def __init__(self, local: Classifier, ask: Callable[[str, str, list[str]], dict]):
        self.local, self.ask = local, ask

    def problem(self, adapter: str) -> str | None:
        return self.local.problem(adapter)

    def probs(self, adapter: str, prompt: str, choices: list[str]) -> dict:
        return self.ask(adapter, prompt, choices)


def publish_dir(target: Path, fill: Callable[[Path], object]) -> Path:
    """Make directory `target` whole or not at all: `fill(tmp)` writes a temp directory beside
    it, which is then renamed to `target`. A `target` that exists already (written by an
    earlier call, maybe another process's: same name, same content) is kept as it is."""
    if (target / CONFIG_NAME).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # other machines' replicas may read it as another user
        fill(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another writer renamed first
            if not (target / CONFIG_NAME).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def merged_dir_name(virtual: str) -> str:
    """The adapter name (and directory name) replicas serve the merged virtual adapter
    `virtual` (merged:STRATEGY:HASH) under: merged-STRATEGY-HASH."""
    return "merged-" + virtual[len(VIRTUAL_PREFIX) :].replace(":", "-")


def is_inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


class SharedAdapters:
    """What a replica needs beyond the shared directory's own entries to run a request,
    made at the ingress (`place`, blocking: RayBackend calls it on its worker thread):

    - a ties / dare merge: the ingress's registry merged it (once per recipe, its merged
      tier); it is written to ROOT/MERGED_DIR/merged-STRATEGY-HASH (once: temp dir, rename)
      and the request names that adapter, so every replica reads the same merge;
    - a hub adapter (`org/name[@rev]`, with the hub on): fetched by the ingress (once per
      name, the registry's HubAdapters), copied to ROOT/HUB_DIR/org/name/COMMIT when its
      snapshot is outside ROOT, and its path sent; without a shared ROOT the hub cache's
      snapshot itself is sent (one machine only: the fleet refuses the hub otherwise);
    - an adapter added through admin from another folder: that folder (fleet.added_path).

    `registry` is the ingress's AdapterRegistry; `added_path(registry, name)` the last."""

    def __init__(self, registry, added_path: Callable[[object, str], Path | None]):
        self.registry, self.added_path = registry, added_path
        self.root = registry.adapters_dir
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def place(self, spec: AdapterSpec) -> tuple[AdapterSpec, dict[str, str]]:
        """(the spec to send, {adapter name: its directory} for the replica to learn)."""
        label, mixture = resolve_adapter(spec)
        if mixture is None and label is not None and is_virtual(label):
            name, path = self.merged(label)
            return name, {name: str(path)}
        if mixture is not None and isinstance(mixture.gate, MoleRef):
            return spec, {}  # the replica's own catalog knows the MoLE's experts
        paths = {}
        hub = self.registry.hub
        for name in adapter_names(spec):
            if hub is not None and hub.claims(name):
                path = self.hub_path(name)
            else:
                path = self.added_path(self.registry, name)
            if path is not None:
                paths[name] = str(path)
        return spec, paths

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def merged(self, virtual: str) -> tuple[str, Path]:
        """(name, directory) of the merged adapter `virtual` in the shared directory."""
        if self.root is None:
            raise LorafleetError(
                "ties / dare merges on Ray need --adapters DIR: the merge is written there"
            )
        name = merged_dir_name(virtual)
        target = self.root / MERGED_DIR / name
        with self._lock(virtual):
            if not (target / CONFIG_NAME).is_file():
                adapter = self.registry.merged.get(virtual)
                if adapter is None:
                    raise LorafleetError(
                        "the merged adapter left the cache before its request ran; send it again"
                    )
                # A copy: write_adapter sets its `path`, and the cached one stays as it is.
                out = Adapter(dict(adapter.config), adapter.tensors, dict(adapter.meta), None)
                publish_dir(target, lambda tmp: write_adapter(tmp, out))
                log.info("wrote %s for the replicas (%s)", target, virtual)
        return name, target

    def hub_path(self, name: str) -> Path:
        """The directory replicas read hub adapter `name` from (fetched first if need be)."""
        with self._lock(name):
            known = self.registry.path_of(name)
            path = known if known is not None else self._fetch(name)
            if self.root is not None and not is_inside(path, self.root):
                org, _, rest = name.partition("/")
                target = self.root / HUB_DIR / org / rest / path.name  # path.name: the commit
                path = publish_dir(target, lambda tmp: _copy_files(path, tmp))
            if known is None:
                self.registry.add(name, path)  # listed from now on, as `lorafleet serve` does
            return path

    def _fetch(self, name: str) -> Path:
        """The hub snapshot of `name`, fetched by the registry's HubAdapters (a local
        ROOT/org/name wins); waits for the fetch, a one-line error when it failed."""
        deadline = time.monotonic() + HUB_WAIT_S
        while True:
            path, reason = self.registry.hub.poll(name)
            if path is not None:
                return Path(path)
            if reason is not None:
                raise LorafleetError(reason)
            if time.monotonic() > deadline:
                raise LorafleetError(f"hub adapter {name}: still fetching after {HUB_WAIT_S:g} s")
            time.sleep(0.05)


def _copy_files(source: Path, target: Path) -> None:
    """The files of the adapter directory `source` (the hub cache's are links to its blobs:
    their contents are copied) into `target`."""
    for item in source.iterdir():
        if item.is_file():
            shutil.copyfile(item, target / item.name)
