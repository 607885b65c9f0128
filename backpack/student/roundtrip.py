"""The round trip of an exported student, run as a script in a fresh process that imports transformers and torch
only (no Backpack): load the exported files as a user would, answer the probe prompts greedily and score the
reference answers (their mean NLL per token). `backpack export` compares the result with the version it wrote.

    python roundtrip.py DIR [GGUF_FILE] < probes.json > result.json
"""

import json
import sys
import time


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    probes = json.load(sys.stdin)
    t0 = time.perf_counter()
    kw = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kw)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kw).eval()
    loaded = time.perf_counter() - t0
    answers, nll, count = [], 0.0, 0
    own_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in probes["texts"]]
    with torch.inference_mode():
        for prompt_ids, reference in zip(probes["prompts"], probes["references"]):
            ids = torch.tensor([prompt_ids])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=probes["max_new_tokens"],
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            answers.append(out[0, len(prompt_ids):].tolist())
            if reference:
                full = torch.tensor([prompt_ids + reference])
                logp = torch.log_softmax(model(full).logits[0, len(prompt_ids) - 1:-1].float(), -1)
                nll -= logp.gather(1, torch.tensor(reference)[:, None]).sum().item()
                count += len(reference)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True) if tokenizer.chat_template else None
    json.dump({"answers": answers, "nll": nll / max(1, count), "load_seconds": loaded, "prompt_ids": own_ids,
               "chat_template": chat,
               "layers": model.config.num_hidden_layers}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
