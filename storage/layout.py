"""The layout of an index run under its output URI: the only place that spells a path inside a run.

```
<root>/config.json                         the run's IndexConfig (read back by the query side)
<root>/run.json                            per stage: parameters, input/output version, counts, time, peak RSS
<root>/LOCK.json                           the lease of the job writing the run (storage.lease)
<root>/corpus/manifest.parquet             image_id, uri, shard, size, version
<root>/tables/<table>/<stage>-<shard>.parquet
<root>/stages/<stage>/shards/<shard>.json  commit marker of a shard (written last, atomically)
<root>/stages/<stage>/stage.json           summary of the stage
<root>/artefacts/<artefact>/<file>         learned state: whitening/, local_pca/, graph/, asmk/, ...
<root>/artefacts/asmk/parts/<kernel>/<shard>/<array>.npy   per-shard ASMK pieces while the asmk stage runs
<root>/indexes/<name>/<version>/...        immutable FAISS / ASMK snapshots; <root>/indexes/<name>/LATEST
```
"""
from __future__ import annotations

from dataclasses import dataclass

from storage.uri import join

CORPUS_DIR, TABLES_DIR, STAGES_DIR, ARTEFACTS_DIR, INDEXES_DIR = "corpus", "tables", "stages", "artefacts", "indexes"
CONFIG_FILE, RUN_FILE, LOCK_FILE, MANIFEST_FILE = "config.json", "run.json", "LOCK.json", "manifest.parquet"
SHARDS_DIR, STAGE_SUMMARY_FILE, LATEST_FILE = "shards", "stage.json", "LATEST"
PINS_DIR, RELEASE_FILE = "PINS", "RELEASE.json"   # readers' pins of snapshot versions; a job's set of versions
PARTS_DIR = "parts"   # per-shard pieces of an artefact before their streaming merge (removed afterwards)

# artefacts: (folder, file) per name; one place for every learned file of a run
ARTEFACT_FILES: dict[str, tuple[str, str]] = {
    "whitening_regions": ("whitening", "regions.npz"),
    "whitening_info": ("whitening", "info.json"),
    "local_pca": ("local_pca", "pca.npz"),
    "cam_whitening": ("cam_whitening", "whitening.npz"),
    "graph_V": ("graph", "V.npy"),
    "graph_f": ("graph", "f.npy"),
    "graph_g": ("graph", "g.npy"),
    "graph_region_index": ("graph", "region_index.npy"),
    "graph_W": ("graph", "graph.npz"),
    "graph_regions": ("graph", "regions.npz"),
    "graph_info": ("graph", "info.json"),
    "asmk_codebook": ("asmk", "codebook.npy"),
    "asmk_info": ("asmk", "info.json"),
    "query_scorer": ("query_scorer", "scorer.npz"),          # seed 000 region scorer (jobs.train_query_scorer)
    "query_scorer_info": ("query_scorer", "info.json"),
    "mined_pairs": ("mined_pairs", "pairs.parquet"),                 # jobs.mine_pairs (issue 17)
    "mined_pairs_info": ("mined_pairs", "info.json"),
    "learned_projection": ("learned_projection", "projection.npz"),  # jobs.train_projection (issue 17)
    "learned_projection_info": ("learned_projection", "info.json"),
    "rpn": ("rpn", "rpn.npz"),                                        # jobs.train_rpn (issue 17)
    "rpn_info": ("rpn", "info.json"),
}



class SnapshotFiles:
    """File names inside an index snapshot's version folder (``indexes/<name>/<version>/``)."""

    INDEX = "index.npy"                  # FAISS index serialised as uint8 (one shard)
    IMAGE_IDS = "image_ids.npy"          # int id -> image id
    REGION_IMAGE = "region_image.npy"    # regional indexes: region row -> int image id
    CODEBOOK = "codebook.npy"            # ASMK visual words
    # itq_regional_<source>: ITQ codes of a regional index's rows (seed 000 §4.2 Hamming prefilter)
    ITQ_MEAN = "itq_mean.npy"
    ITQ_PROJECTION = "itq_projection.npy"
    ITQ_ROTATION = "itq_rotation.npy"
    BINARY_INDEX = "binary_index.npy"    # FAISS binary index serialised as uint8 (ids = region rows)
    VECTORS = "vectors.npy"              # exact rows for the re-rank, when the regional index cannot give them

    @staticmethod
    def itq_name(regional_name: str) -> str:
        """Snapshot name of the ITQ prefilter of a regional index (``regional_os_egm`` -> ``itq_regional_os_egm``)."""
        return f"itq_{regional_name}"

    @staticmethod
    def shard(i: int) -> str:
        """FAISS index shard ``i`` (when an index is kept in shards)."""
        return f"shard-{i:05d}.npy"

    @staticmethod
    def array(key: str) -> str:
        """One array of an ASMK inverted file (``word_ptr``, ``vecs``, ...)."""
        return f"{key}.npy"


# every literal name a run's paths are made of (tests check that no module outside storage/ spells one)
RUN_ENTRY_NAMES = frozenset({CORPUS_DIR, TABLES_DIR, STAGES_DIR, ARTEFACTS_DIR, INDEXES_DIR, CONFIG_FILE, RUN_FILE,
                             LOCK_FILE, MANIFEST_FILE, SHARDS_DIR, STAGE_SUMMARY_FILE, LATEST_FILE, PINS_DIR,
                             RELEASE_FILE}
                            | {f for _, f in ARTEFACT_FILES.values()} | {d for d, _ in ARTEFACT_FILES.values()})


def shard_label(shard: int | str) -> str:
    """Canonical shard label (``00042``, or a string label such as ``d20261123-00001``)."""
    return f"{shard:05d}" if isinstance(shard, int) else str(shard)


@dataclass(frozen=True)
class RunLayout:
    """Every location inside the run at ``root`` (a local path or a URI)."""

    root: str

    # ---------------------------------------------------------------- top level
    @property
    def config(self) -> str:
        return join(self.root, CONFIG_FILE)

    @property
    def run_manifest(self) -> str:
        return join(self.root, RUN_FILE)

    @property
    def lock(self) -> str:
        return join(self.root, LOCK_FILE)

    @property
    def corpus_manifest(self) -> str:
        return join(self.root, CORPUS_DIR, MANIFEST_FILE)

    # ---------------------------------------------------------------- tables and commit markers
    def table_file(self, table: str, stage: str, shard: int | str, stamp: str | None = None) -> str:
        """A shard's file of ``table`` written by ``stage`` (``stamp``: a rewritten copy under a new name)."""
        name = f"{stage}-{shard_label(shard)}" + (f".{stamp}" if stamp else "")
        return join(self.root, TABLES_DIR, table, name + ".parquet")

    def stage_dir(self, stage: str) -> str:
        return join(self.root, STAGES_DIR, stage)

    @property
    def stages_dir(self) -> str:
        return join(self.root, STAGES_DIR)

    def shard_markers_dir(self, stage: str) -> str:
        return join(self.stage_dir(stage), SHARDS_DIR)

    def shard_marker(self, stage: str, shard: int | str) -> str:
        return join(self.shard_markers_dir(stage), shard_label(shard) + ".json")

    def stage_summary(self, stage: str) -> str:
        return join(self.stage_dir(stage), STAGE_SUMMARY_FILE)

    # ---------------------------------------------------------------- artefacts
    def artefact(self, name: str) -> str:
        """A learned file by name (see :data:`ARTEFACT_FILES`)."""
        if name not in ARTEFACT_FILES:
            raise KeyError(f"unknown artefact {name!r}; known: {sorted(ARTEFACT_FILES)}")
        folder, file = ARTEFACT_FILES[name]
        return join(self.root, ARTEFACTS_DIR, folder, file)

    def whitening(self, name: str) -> str:
        """A stored whitening: ``regions`` or ``global-<method>``."""
        if name == "regions":
            return self.artefact("whitening_regions")
        folder = ARTEFACT_FILES["whitening_regions"][0]
        return join(self.root, ARTEFACTS_DIR, folder, f"{name}.npz")

    @property
    def asmk_parts_dir(self) -> str:
        """Per-shard ASMK inverted files of the running ``asmk`` stage (merged into snapshots, then removed)."""
        return join(self.root, ARTEFACTS_DIR, ARTEFACT_FILES["asmk_codebook"][0], PARTS_DIR)

    def asmk_part(self, kernel: str, shard: int | str, key: str) -> str:
        """One array (``word_ptr``, ``vecs``, ...) of one shard's inverted file for ``kernel``."""
        return join(self.asmk_parts_dir, kernel, shard_label(shard), f"{key}.npy")

    def artefact_dir(self, folder: str) -> str:
        """The folder of a family of artefacts (``whitening``, ``graph``, a trained model's name ...)."""
        return join(self.root, ARTEFACTS_DIR, folder)

    # ---------------------------------------------------------------- index snapshots
    @property
    def indexes_dir(self) -> str:
        return join(self.root, INDEXES_DIR)

    def index_dir(self, name: str) -> str:
        return join(self.root, INDEXES_DIR, name)

    def index_latest(self, name: str) -> str:
        return join(self.index_dir(name), LATEST_FILE)

    def index_pins(self, name: str) -> str:
        """Pins of readers holding versions of index ``name`` (the pruner keeps pinned versions)."""
        return join(self.index_dir(name), PINS_DIR)

    @property
    def release(self) -> str:
        """The set of index versions one job published together (readers open them as one release)."""
        return join(self.indexes_dir, RELEASE_FILE)


__all__ = ["RunLayout", "SnapshotFiles", "shard_label", "ARTEFACT_FILES", "RUN_ENTRY_NAMES"]
