"""The checks of a student before Ray Train starts: it loads (a missing base, a bad LoRA target, bad layers:
clear errors here), it shares its tokenizer with the teachers when token-level KD is asked for, and the dataset
holds rows it can learn from, with teacher logprobs deep enough."""

from __future__ import annotations

from backpack.config import RunConfig, TrainingConfig
from backpack.data.splits import training_rows
from backpack.errors import InputError
from backpack.runtime.progress import Reporter

# Text whose token ids a vLLM endpoint and the student must agree on for the endpoint to score the student's ids
PROBE = "Backpack's probe: 12,345 tokens; Ünïcode, \"quotes\" and\n\tnew lines — emoji 🎒."


def teacher_tokenizer_fingerprints(cfg: RunConfig, student=None) -> dict[str, str]:
    """Each teacher's tokenizer fingerprint: hf and vllm teachers encode with the model's own tokenizer; a remote
    endpoint's is unknown (its rows hold text only, never the student's token ids), except a vLLM endpoint
    that scores (endpoint.scoring vllm), which shares the student's when it encodes PROBE as `student` does."""
    from transformers import AutoTokenizer

    from backpack.student.autopilot import tokenizer_fingerprint
    from backpack.teachers.loader import resolve_model

    out = {}
    for t in cfg.teachers:
        if t.backend in ("hf", "vllm"):
            out[t.name] = tokenizer_fingerprint(AutoTokenizer.from_pretrained(resolve_model(t.model).path))
        elif student is not None and t.endpoint is not None and t.endpoint.scoring == "vllm" \
                and _endpoint_encodes_as(t, student.tokenizer):
            out[t.name] = student.tokenizer_fingerprint
        else:
            out[t.name] = f"remote:{t.name}"
    return out


def _endpoint_encodes_as(t, tokenizer) -> bool:
    """Whether the vLLM server of teacher `t` encodes PROBE into the ids `tokenizer` does."""
    from backpack.teachers.openai import OpenAITeacher

    try:
        ids = OpenAITeacher(t).tokenize(PROBE)
    except Exception as e:  # noqa: BLE001 - unreachable, not vLLM, a bad key: one clear message either way
        raise InputError(f"teacher {t.name!r}: cannot ask its endpoint how it tokenizes ({e})") from None
    return ids == tokenizer(PROBE, add_special_tokens=False)["input_ids"]


def student_checks(cfg: RunConfig, rep: Reporter):
    """The checks of the student before any data is looked at. Returns (training config to use, whether
    teacher token ids can be used as-is, the loaded student)."""
    from backpack.student.autopilot import load_student

    tc = cfg.training
    student = load_student(cfg.student)
    teachers = teacher_tokenizer_fingerprints(cfg, student)
    same = all(fp == student.tokenizer_fingerprint for fp in teachers.values())
    if not same:
        names = [n for n, fp in teachers.items() if fp != student.tokenizer_fingerprint]
        if tc.objective != "off_policy":
            raise InputError(f"training.objective {tc.objective} has the teachers score the student's own token "
                             f"ids, but {names} use another tokenizer than the student's: use teachers that "
                             "share it, or objective off_policy")
        if tc.kd_weight > 0 and tc.on_tokenizer_mismatch == "error":
            raise InputError(f"token-level KD (training.kd_weight={tc.kd_weight}) needs the student to share its "
                             f"tokenizer with the teachers, but {names} use another one (a remote endpoint's "
                             "answers never carry the student's token ids); set "
                             "training.on_tokenizer_mismatch=sequence_level to train on their text instead")
        rep.stage(f"teachers {names} use another tokenizer: training on their text only (sequence-level KD)")
        tc = tc.model_copy(update={"kd_weight": 0.0})
    return tc, same, student


def preflight(cfg: RunConfig, train_rows, rep: Reporter) -> tuple[TrainingConfig, bool]:
    """The checks before a batch run's Ray Train starts, on the rows it would train on (a table of the rows
    not held out). Returns the training config to use and whether teacher token ids can be used as-is."""
    from backpack.student.examples import build_examples

    tc, same, student = student_checks(cfg, rep)
    if cfg.grounded_only:
        before = train_rows.column("status").to_pylist().count("ok")
        train_rows = training_rows(train_rows, 0.0, grounded_only=True)
        rep.stage(f"mental.train_on=grounded: {train_rows.num_rows} of {before} answer(s) state only what their "
                  "recalled context says; the others are not trained on")
    rows = train_rows.to_pylist()
    examples, stats = build_examples(rows, student.tokenizer, tc.max_len, same, use_logprobs=False)
    if not examples:
        raise InputError(f"no usable training rows: {stats.rows} row(s), {stats.failed_rows} failed, "
                         f"{stats.too_long_prompt} with a prompt longer than training.max_len={tc.max_len}"
                         + (" (after mental.train_on=grounded)" if cfg.grounded_only else ""))
    if stats.truncated:
        rep.stage(f"warning: {stats.truncated} of {stats.used} training sequence(s) are longer than "
                  f"training.max_len={tc.max_len} and were truncated")
    if tc.kd_weight > 0:
        depth = min((len(r["top_ids"][0]) for r in rows if r["status"] == "ok" and r["top_ids"]), default=0)
        if depth < tc.top_k:
            raise InputError(f"training.top_k={tc.top_k} but the dataset stores {depth} logprobs per token: "
                             f"regenerate with decoding.logprobs >= {tc.top_k} or lower training.top_k")
    return tc, same
