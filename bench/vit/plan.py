"""What the ViT suite runs: the development and confirmation halves, the method labels, the protocol.

The split of the ten tasks was drawn once, before any run, by a seeded shuffle within each
VTAB group (seed 2507; bench/vit/PREREGISTRATION.md). Settings are chosen on the development
half only; the confirmation half runs once, with the rule written down first.
"""

from __future__ import annotations

from ..quality.baselines import PEFT_METHODS
from ..quality.pool import Spec
from .suite import TASK_NAMES
from .tasks import CHECKPOINTS

DEV = ("photos", "digits", "microscopy", "corruption", "rotation")
CONFIRM = ("letters", "sketch", "count", "position", "size")
assert sorted(DEV + CONFIRM) == sorted(TASK_NAMES)
TASK_ORDER = DEV + CONFIRM
SEEDS = range(5)
SELECT_SEEDS = 1  # every lr runs on seed 0; the lr with the best validation accuracy runs on seeds 1-4
LRS = (1e-3, 3e-3, 1e-2)
STEPS = {False: 100, True: 48}  # 1k regime: 8 epochs of batch 64; few-shot: 12 epochs of batch 25
BOOTSTRAP = 10_000  # draws of the two-way bootstrap (tasks × seeds) behind every interval of the report
REF = "pretrain_source=reference"  # the true pre-training sample (4,096 Fashion-MNIST training images)

# pre-training statistics for Cross and Shift: the true sample, the weight proxy, isotropic; Self has none
PREMISE = ["cntlora-self", f"cntlora-cross@{REF}", f"cntlora-shift@{REF}", "cntlora-cross@pretrain_source=weights",
           "cntlora-shift@pretrain_source=weights", "cntlora-cross@pretrain_source=isotropic",
           "cntlora-shift@pretrain_source=isotropic"]
DEV_LABELS = PEFT_METHODS + PREMISE + [
    "cntlora-self-vas", f"cntlora-cross-vas@{REF}",
    f"cntlora-cross@{REF},directions=generalized",  # A from where fine-tuning energy exceeds pre-training energy
    "cntlora-self-vas@a_row_norm=1",  # the setting recommended on the MobileNetV2 few-shot table
]
# the follow-up (PREREGISTRATION.md, "Follow-up: the start's function and scale"): a subspace start only picks A's
# directions, and those moved accuracy little; these starts change the function at step 0 or A's scale
FOLLOWUP = ["cntlora-self@base=residual,strength=None", f"cntlora-cross@{REF},base=residual,strength=None",
            f"cntlora-shift@{REF},base=keep", "cntlora-self@a_row_norm=1"]
# which layers (PREREGISTRATION.md, "Which layers: VAS ranks by input shift"): the rank budget goes to the layers
# whose inputs moved most from pre-training (vas_score="shift", true C_p); each is compared with its "energy" twin
LAYERS = [f"cntlora-self-vas@{REF},vas_score=shift", f"cntlora-cross-vas@{REF},vas_score=shift"]
TWINS = {LAYERS[0]: "cntlora-self-vas", LAYERS[1]: f"cntlora-cross-vas@{REF}"}
# the studies after the main plan, each with its own rule (PREREGISTRATION.md); its specs carry its name as a suffix
STUDIES = {"followup": FOLLOWUP, "layers": LAYERS}
EDGE = {min(LRS): 3e-4, max(LRS): 3e-2}  # one step past each end of the grid (PREREGISTRATION.md, "Learning-rate edges")
SIZES = (64, 256, 1024)  # smaller true samples, for the accuracy-against-sample-size plot
# the order of a run of both halves together (PREREGISTRATION.md, "One call for both halves"): the PEFT inits
# and the premise's labels first, on both halves, then the size sweep, then the rest
CORE_LABELS = PEFT_METHODS + PREMISE
EXTRA_LABELS = [label for label in DEV_LABELS if label not in CORE_LABELS]


def specs(tasks, labels, regimes=(False, True), sizes=()) -> list:
    """run_many specs: one per task and regime, the size sweep (1k regime only) after.

    Args:
        tasks: suite task names.
        labels: method labels.
        regimes: False for the 1k regime, True for few-shot.
        sizes: true-sample sizes for Cross and Shift.

    Returns:
        The specs, in run order.
    """
    out = []
    for fewshot in regimes:
        for task in tasks:
            name = f"vit-{task}" + ("-fewshot" if fewshot else "")
            out.append(Spec(name=name, task="vit", methods=list(labels), seeds=list(SEEDS), lrs=list(LRS),
                            steps=STEPS[fewshot], task_kwargs={"suite": task, "fewshot": fewshot},
                            checkpoints=CHECKPOINTS, select_seeds=SELECT_SEEDS))
    if sizes:
        sweep = [f"cntlora-{mode}@{REF},ref={n}" for mode in ("cross", "shift") for n in sizes]
        out += [Spec(name=f"vit-{task}-sizes", task="vit", methods=sweep, seeds=list(SEEDS), lrs=list(LRS),
                     steps=STEPS[False], task_kwargs={"suite": task, "fewshot": False}, checkpoints=CHECKPOINTS,
                     select_seeds=SELECT_SEEDS) for task in tasks]
    return out


def priority_specs(sizes=SIZES) -> list:
    """Both halves in one run_many call, most needed first, so a time limit cuts the least needed.

    The order: the core labels (CORE_LABELS) on the development half, then on the confirmation
    half; the size sweep on the confirmation half; last, the other labels on the development
    half, then on the confirmation half. The specs of the other labels are named with a
    "-more" suffix (run_many needs one name per lr-selecting spec).

    Args:
        sizes: true-sample sizes of the sweep; () for none.

    Returns:
        The specs, in run order.
    """
    out = specs(DEV, CORE_LABELS) + specs(CONFIRM, CORE_LABELS) + specs(CONFIRM, [], regimes=(), sizes=sizes)
    for tasks in (DEV, CONFIRM):
        for spec in specs(tasks, EXTRA_LABELS):
            spec.name += "-more"
            out.append(spec)
    return out


def study_specs(study: str) -> list:
    """A study's runs (STUDIES): its labels on the development half, then on the confirmation half.

    The spec names carry the study's name as a suffix, e.g. "-followup" (run_many needs one name
    per lr-selecting spec).

    Args:
        study: a key of STUDIES.

    Returns:
        The specs, in run order.
    """
    out = []
    for tasks in (DEV, CONFIRM):
        for spec in specs(tasks, STUDIES[study]):
            spec.name += f"-{study}"
            out.append(spec)
    return out


def followup_specs() -> list:
    """The follow-up's runs (study_specs("followup"))."""
    return study_specs("followup")


def edge_specs(chosen: dict) -> list:
    """The main plan and the follow-up, each label's grid extended one step past the edge it chose.

    Every spec comes back (run_many skips what the logs hold, and completes what they miss);
    a label whose seed-0 choice on the grid LRS was its lowest or highest lr also runs seed 0
    at EDGE's next lr, and seeds 1-4 wherever that lr wins on validation.

    Args:
        chosen: {label: {(task, fewshot): lr chosen on the grid LRS}} (report.accuracies with lrs=LRS).

    Returns:
        The specs, in run order: priority_specs() without the size sweep, then followup_specs().
    """
    out = priority_specs(()) + followup_specs()
    for spec in out:
        cell = (spec.task_kwargs["suite"], spec.task_kwargs["fewshot"])
        for label in spec.methods:
            lr = chosen.get(label, {}).get(cell)
            if lr in EDGE:
                spec.label_lrs[label] = sorted({*LRS, EDGE[lr]})
    return out
