"""The papers' tables as data: which variants a table trains, which is its baseline, what the papers report.

Overrides are `--set a.b=c` strings. A run's overrides stack in this order: the size's, the table's `common`
(the dataset's shape included: `data.synth.*` is read when the data is synthesised), the table's `per_size` for the
chosen size, the variant's, the stage's, then the user's `--set`. They may name `$steps` and `$half_steps` (the run's
resolved `training.steps`, halved) and, in a later stage, `${stage_NAME}`: the run directory of the variant's stage
NAME for the same seed (e.g. `model.content_init="${stage_pretrain}/encoder.pt"`).

Paper deltas are what the papers report against this table's baseline (derived where the paper's baseline differs),
in the papers' own units (percent, AUC and QAUC); the report compares their signs with ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    """One training run of a variant; the last stage's eval is the variant's result."""

    name: str
    overrides: tuple[str, ...] = ()
    keep_checkpoints: bool = False
    """Keep `checkpoints/` after the run (a later stage reads them); otherwise they are deleted to save disk."""


@dataclass(frozen=True)
class Variant:
    """A row of the table."""

    name: str
    overrides: tuple[str, ...] = ()
    stages: tuple[Stage, ...] = ()
    """Several runs in order, each on top of `overrides`; empty = one run."""
    paper: dict[str, float] = field(default_factory=dict)
    """The paper's delta vs the table's baseline per metric (auc, qauc, ...), in percent."""
    note: str = ""
    """One line for the report (what the paper reports beyond the deltas, caveats)."""

    def stage_list(self) -> tuple[Stage, ...]:
        return self.stages or (Stage(""),)


@dataclass(frozen=True)
class Check:
    """A claim tested on the mean paired delta `variant - other` of `metric`, in percentage points."""

    text: str
    variant: str
    other: str
    metric: str
    above: float
    """The claim holds when the mean delta is > this (e.g. -0.2: 'no more than 0.2 points worse')."""


@dataclass(frozen=True)
class Table:
    name: str
    description: str
    baseline: str
    variants: tuple[Variant, ...]
    common: tuple[str, ...] = ()
    per_size: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Extra overrides for one size (e.g. a shorter history at small)."""
    throughput: bool = False
    """Show each variant's training samples/s in the table (the point of the table is cost)."""
    cumulative: bool = False
    """Each row adds to the one above it: the report also gives each row's step over the previous one."""
    checks: tuple[Check, ...] = ()
    source: str = ""
    """Where the paper's numbers come from."""

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate variant names {names}")
        if self.baseline not in names:
            raise ValueError(f"{self.name}: baseline {self.baseline!r} is not a variant")
        for variant in self.variants:
            stage_overrides = [o for s in variant.stages for o in s.overrides]
            if any(o.startswith("data.synth.") for o in (*variant.overrides, *stage_overrides)):
                raise ValueError(f"{self.name}/{variant.name}: data.synth.* belongs in the table's common")
        for check in self.checks:
            if {check.variant, check.other} - set(names):
                raise ValueError(f"{self.name}: check {check.text!r} names an unknown variant")

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(
            f"{self.name}: no variant {name!r}; variants: {', '.join(v.name for v in self.variants)}"
        )


# -------------------------------------------------------------------------------------------- building blocks

TEXT_ONLY = (
    "data.synth.images_per_item=0",
    "data.synth.search=true",
    "data.images_per_sample=0",
    "model.use_images=false",
)
"""LEMUR's dataset: raw text only (titles, descriptions, OCR), search scenario with queries and sessions."""

WITH_IMAGES = (
    "data.synth.images_per_item=1",
    "data.synth.search=true",
    "data.images_per_sample=1",
    "model.use_images=true",
)
"""EM3's dataset: text and one cover image per item."""

ID_ONLY = ("model.use_content=false", "memory_bank.enabled=false")
LEMUR_FULL = (
    "model.use_content=true",
    'model.ranker="rankmixer"',
    'model.history_encoder="longer"',
    "memory_bank.enabled=true",
    "training.sqdc_weight=0.1",
)
"""The full LEMUR model: content towers end to end, RankMixer, LONGER, memory bank + similarity module, SQDC."""

EM3_CONTENT = (
    "model.use_content=true",
    'model.fusion="fqformer"',
    "model.fusion_layers=2",
    "memory_bank.enabled=false",
)
"""EM3's content model. Two fusion layers: with one, the masked FQ-Former equals the plain one (the queries attend
to everything; the masked text/image token outputs are never read)."""


def _lemur_cumulative() -> Table:
    def step(name: str, ranker: str, history: str, *extra: str, paper: dict[str, float]) -> Variant:
        over = (f'model.ranker="{ranker}"', f'model.history_encoder="{history}"', *extra)
        return Variant(name, over, paper=paper)

    no_content = ("model.use_content=false", "memory_bank.enabled=false")
    sqdc = ("model.use_content=true", "training.sqdc_weight=0.1")
    return Table(
        name="lemur-cumulative",
        description="LEMUR's cumulative table: DLRM-MLP, +RankMixer, +LONGER, +SQDC (content end to end), +memory bank",
        baseline="dlrm_mlp",
        common=TEXT_ONLY,
        cumulative=True,
        variants=(
            step("dlrm_mlp", "dlrm_mlp", "mean", *no_content, paper={}),
            step("+rankmixer", "rankmixer", "mean", *no_content, paper={"auc": 0.49, "qauc": 0.59}),
            step("+longer", "rankmixer", "longer", *no_content, paper={"auc": 0.89, "qauc": 1.04}),
            step(
                "+sqdc",
                "rankmixer",
                "longer",
                *sqdc,
                "memory_bank.enabled=false",
                paper={"auc": 1.22, "qauc": 1.51},
            ),
            step(
                "+memory_bank",
                "rankmixer",
                "longer",
                *sqdc,
                "memory_bank.enabled=true",
                paper={"auc": 1.44, "qauc": 1.85},
            ),
        ),
        source="LEMUR Table (Douyin Search, 70 days): DLRM-MLP AUC 0.74071, QAUC 0.63760; deltas cumulative",
    )


def _two_stage_stages() -> tuple[Stage, Stage]:
    """LEMUR's two-stage baseline: pretrain the encoder contrastively (SQDC), then rank with it frozen."""
    pretrain = Stage(
        "pretrain",
        ('training.objective="contrastive"', "training.sqdc_weight=0.1", "memory_bank.enabled=false"),
    )
    rank = Stage(
        "rank",
        (
            'model.content_init="${stage_pretrain}/encoder.pt"',
            "model.freeze_content=true",
            "training.sqdc_weight=0",
        ),
    )
    return pretrain, rank


def _lemur_two_stage() -> Table:
    return Table(
        name="lemur-two-stage",
        description="two-stage (SQDC-pretrained, then frozen encoder) vs end-to-end LEMUR, over an ID-only model",
        baseline="id_only",
        common=TEXT_ONLY,
        variants=(
            Variant("id_only", (*ID_ONLY, 'model.history_encoder="longer"')),
            Variant("two_stage", LEMUR_FULL, stages=_two_stage_stages(), paper={"qauc": 0.12}),
            Variant("end_to_end", LEMUR_FULL, paper={"qauc": 0.81}),
        ),
        source="LEMUR: QAUC over the production baseline, two-stage +0.12%, end to end +0.81%",
    )


def _lemur_ablations() -> Table:
    def ablation(name: str, over: str, full_minus: float) -> Variant:
        return Variant(name, (*LEMUR_FULL, over), paper={"qauc": round(full_minus - 0.81, 2)})

    return Table(
        name="lemur-ablations",
        description="LEMUR's ablations of the full model: stop-gradient, no short/long content sequence, "
        "no similarity module, no SQDC, no session mask, with CIC",
        baseline="full",
        common=TEXT_ONLY,
        variants=(
            Variant("full", LEMUR_FULL),
            ablation("stop_gradient", "model.stop_gradient=true", 0.50),
            ablation("no_short_content", 'model.no_content_histories=["short"]', 0.77),
            ablation("no_long_content", 'model.no_content_histories=["long"]', 0.56),
            ablation("no_similarity", "model.similarity_top_k=0", 0.69),
            ablation("no_sqdc", "training.sqdc_weight=0", 0.64),
            ablation("no_session_mask", "training.sqdc_session_mask=false", 0.71),
            ablation("with_cic", "training.cic_weight=0.1", 0.79),
        ),
        source="LEMUR ablations: QAUC gain of the full model +0.81%; paper deltas here = ablation - full",
    )


def _lemur_sampling() -> Table:
    def shares(name: str, p: float, q: float, paper_qauc: float, note: str) -> Variant:
        over = (*LEMUR_FULL, f"memory_bank.forward_share={p}", f"memory_bank.backward_share={q}")
        paper = {"qauc": round(paper_qauc - 0.81, 2)} if name != "p100_q100" else {}
        return Variant(name, over, paper=paper, note=note)

    return Table(
        name="lemur-sampling",
        description="LEMUR's encoder sampling: a share p of the targets runs the encoder forward, q backward",
        baseline="p100_q100",
        common=TEXT_ONLY,
        throughput=True,
        variants=(
            shares("p100_q100", 1.0, 1.0, 0.81, "paper: 4,303 GFLOPs, QAUC +0.81%"),
            shares("p100_q20", 1.0, 0.2, 0.78, "paper: 3,232 GFLOPs, QAUC +0.78%"),
            shares("p20_q20", 0.2, 0.2, 0.76, "paper: 2,439 GFLOPs, QAUC +0.76%"),
            shares("p10_q10", 0.1, 0.1, 0.75, "paper: 2,262 GFLOPs, QAUC +0.75%"),
        ),
        source="LEMUR sampling table (params / FLOPs / QAUC over the production baseline)",
    )


def _em3_fusion() -> Table:
    def fusion(name: str) -> Variant:
        return Variant(name, (*EM3_CONTENT, f'model.fusion="{name}"'))

    return Table(
        name="em3-fusion",
        description="EM3's fusion ablation on text + images: 1flow (concat), 2flow, FQ-Former, masked FQ-Former, ID only",
        baseline="1flow",
        common=WITH_IMAGES,
        variants=(
            fusion("1flow"),
            fusion("2flow"),
            fusion("fqformer"),
            fusion("masked_fqformer"),
            Variant("id_only", ID_ONLY),
        ),
        source="EM3 reports FQ-Former best without public numbers for this ablation",
    )


def _em3_cic() -> Table:
    return Table(
        name="em3-cic",
        description="EM3's content-ID contrastive loss on the FQ-Former content model with images",
        baseline="no_cic",
        common=WITH_IMAGES,
        variants=(
            Variant("no_cic", (*EM3_CONTENT, "training.cic_weight=0")),
            Variant("cic", (*EM3_CONTENT, "training.cic_weight=0.1"), note="a reimplementation's weight"),
            Variant(
                "cic_1e-3", (*EM3_CONTENT, "training.cic_weight=0.001"), note="EM3's public code's weight"
            ),
        ),
        source="EM3 reports CIC helps (cold start above all) without public numbers for this ablation",
    )


def _bank_quality() -> Table:
    return Table(
        name="bank-quality",
        description="issue 4's quality study at history 32: memory bank vs recomputing every history item vs "
        "no history content",
        baseline="recompute",
        common=(*TEXT_ONLY, "model.max_history={long = 32}"),
        throughput=True,
        variants=(
            Variant("recompute", (*LEMUR_FULL, 'memory_bank.mode="recompute"')),
            Variant("bank", (*LEMUR_FULL, 'memory_bank.mode="bank"')),
            Variant("no_history_content", (*LEMUR_FULL, "memory_bank.enabled=false")),
        ),
        checks=(
            Check("bank is no more than 0.2 points of AUC below recompute", "bank", "recompute", "auc", -0.2),
            Check("bank is above no_history_content in AUC", "bank", "no_history_content", "auc", 0.0),
        ),
        source="issue 4's goal: the bank within 0.2% AUC of recomputing, and above no history content",
    )


def _lora() -> Table:
    return Table(
        name="lora",
        description="EM3's LoRA for long sequences: LONGER trained on short histories, then LoRA adapters on the "
        "full ones, vs full histories throughout and short histories throughout",
        baseline="long_only",
        common=TEXT_ONLY,
        variants=(
            Variant("long_only", LEMUR_FULL),
            Variant(
                "lora",
                (
                    *LEMUR_FULL,
                    "lora.rank=4",
                    "lora.phase2_start=$half_steps",
                    "lora.short_history={long = 20}",
                ),
                note="phase 1 (short histories) for the first half of the steps",
            ),
            Variant("short_only", (*LEMUR_FULL, "model.max_history={long = 20}")),
        ),
        source="EM3 describes LoRA for long sequences without public numbers",
    )


CHURN_WORLD = (
    'data.synth.world="churn"',
    "data.synth.new_items_per_day=0.02",
    "data.synth.item_lifetime_days=3",
)
"""Issue 13's churn world: items born every day, popularity decaying with age, eval at the end of the log (about
half its rows on items in no training sample, `cold`)."""

CONTENT_E2E = ("model.use_content=true", "memory_bank.enabled=false", "training.sqdc_weight=0.1")
"""The content towers end to end on the target item with SQDC (LEMUR's "+sqdc" row), no history content. Without
SQDC the towers learned too little at this scale to beat ID-only anywhere (benchmarks/experiments.md)."""


BIG_ITEM_TABLE = "embeddings.hash_sizes={item_id = 100003}"
"""An item table with next to no hash collisions (by default the tiny world's 800 items share 1,600 rows, and 27% of
its cold eval rows land on a row that trained: the ID-frequency gate then reads them as known)."""


CIC = "training.cic_weight=0.1"
"""EM3's content-ID contrastive alignment (the content vector and the ID embeddings pulled together, in-batch)."""


VOCAB = 'embeddings.id_map="vocab"'
"""Issue 13's item vocabulary instead of hashing (`trainer/data/id_vocab.py`): a row of its own per train item, one
reserved row (never trained, gate count 0) for every item absent from training; the table keeps its default rows."""


def _cold_start_churn() -> Table:
    def dropout(p: float, *extra: str, name: str = "content", suffix: str = "") -> Variant:
        return Variant(
            f"{name}_drop{round(100 * p)}{suffix}", (*CONTENT_E2E, f"model.item_id_dropout={p}", *extra)
        )

    def gate(k: int, p: float = 0.0, *extra: str, name: str = "content", suffix: str = "") -> Variant:
        drop = f"_drop{round(100 * p)}" if p else ""
        return Variant(
            f"{name}{drop}_gate{k}{suffix}",
            (*CONTENT_E2E, f"model.item_id_dropout={p}", f"model.id_gate_count={k}", *extra),
        )

    return Table(
        name="cold-start-churn",
        description="issue 13: on the churn world, ID-only vs content end to end (SQDC) without and with the cold "
        "path (model.item_id_dropout = p: a learned new-item embedding for cold targets), the ID-frequency gate "
        "(model.id_gate_count = k: g * ID + (1 - g) * new-item, g = n / (n + k), targets and history tokens; "
        "n = 0 is new in eval), EM3's CIC alignment (training.cic_weight), and with history content from the memory "
        "bank, and LEMUR's two-stage baseline (the encoder pretrained contrastively, then frozen); cold and warm AUC",
        baseline="id_only",
        common=(*TEXT_ONLY, *CHURN_WORLD),
        per_size={"small": ("training.steps=400",)},
        variants=(
            Variant("id_only", ID_ONLY),
            Variant("content", CONTENT_E2E),
            dropout(0.1),
            dropout(0.2),
            dropout(0.5),
            dropout(0.2, "memory_bank.enabled=true", name="bank"),
            gate(5),
            gate(20),
            gate(5, 0.5),
            gate(20, 0.5),
            gate(5, 0.5, 'model.id_gate_history="off"', suffix="_hist_off"),
            gate(5, 0.5, 'model.id_gate_history="cold"', suffix="_hist_cold"),
            dropout(0.5, "memory_bank.enabled=true", name="bank"),
            gate(5, 0.5, "memory_bank.enabled=true", name="bank"),
            gate(
                5,
                0.5,
                "memory_bank.enabled=true",
                'model.id_gate_history="off"',
                name="bank",
                suffix="_hist_off",
            ),
            dropout(0.5, BIG_ITEM_TABLE, suffix="_big_table"),
            gate(5, 0.5, BIG_ITEM_TABLE, suffix="_big_table"),
            Variant("content_cic", (*CONTENT_E2E, CIC)),
            dropout(0.2, CIC, suffix="_cic"),
            dropout(0.5, CIC, suffix="_cic"),
            gate(5, 0.5, CIC, suffix="_cic"),
            dropout(0.5, "memory_bank.enabled=true", CIC, name="bank", suffix="_cic"),
            dropout(
                0.5,
                "memory_bank.enabled=true",
                "memory_bank.warm_up=true",
                CIC,
                name="bank",
                suffix="_cic_warm",
            ),
            Variant("id_only_vocab", (*ID_ONLY, VOCAB)),
            gate(5, 0.5, VOCAB, suffix="_vocab"),
            dropout(0.5, CIC, VOCAB, suffix="_cic_vocab"),
            gate(5, 0.5, CIC, VOCAB, suffix="_cic_vocab"),
            Variant(
                "two_stage_drop50",
                (*CONTENT_E2E, "model.item_id_dropout=0.5"),
                stages=_two_stage_stages(),
                note="the encoder pretrained contrastively, then frozen under the ranker with the cold path",
            ),
            Variant(
                "two_stage_drop50_cic",
                (*CONTENT_E2E, "model.item_id_dropout=0.5", CIC),
                stages=_two_stage_stages(),
                note="as two_stage_drop50 with CIC in both stages (the frozen encoder's vectors pull the ID rows)",
            ),
        ),
        checks=(
            Check(
                "content + cold path (p = 0.5) beats ID-only by >= 5 points of cold AUC",
                "content_drop50",
                "id_only",
                "cold_auc",
                5.0,
            ),
            Check(
                "content + cold path (p = 0.5) is not worse than ID-only on warm AUC",
                "content_drop50",
                "id_only",
                "warm_auc",
                0.0,
            ),
            Check(
                "the cold path (p = 0.5) raises content's cold AUC",
                "content_drop50",
                "content",
                "cold_auc",
                0.0,
            ),
            Check(
                "the ID-frequency gate (k = 5, counts instead of the dataset's cold flag) is within 1 point of cold AUC "
                "of the dropout alone",
                "content_drop50_gate5",
                "content_drop50",
                "cold_auc",
                -1.0,
            ),
        ),
        source="issue 13's goal: >= +5 cold-AUC points over ID-only, warm items not worse, beyond seed noise",
    )


TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        _lemur_cumulative(),
        _lemur_two_stage(),
        _lemur_ablations(),
        _lemur_sampling(),
        _em3_fusion(),
        _em3_cic(),
        _bank_quality(),
        _lora(),
        _cold_start_churn(),
    )
}


def get_table(name: str) -> Table:
    if name not in TABLES:
        raise ValueError(
            f"unknown experiment {name!r}; experiments: {', '.join(TABLES)} (lemur experiment --list)"
        )
    return TABLES[name]
