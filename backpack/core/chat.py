"""Chat formatting: the messages a teacher answers, and the token ids of a conversation under a model's chat
template. Every backend and the student's training build their prompts with these, so they always agree."""

from __future__ import annotations


def with_context(messages: list[dict], context: str | None) -> list[dict]:
    """The messages a teacher answers: `context` (recalled knowledge) leads the system message, before the
    prompt's own system text if it has one."""
    if not context:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{context}\n\n{messages[0]['content']}"}] + messages[1:]
    return [{"role": "system", "content": context}] + messages


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, ending with the assistant-turn opener. The
    same function builds teacher prompts and student training prompts, so the two always agree."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
