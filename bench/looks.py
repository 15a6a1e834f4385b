"""Does the model look at the image? The loss on packed rows with each document's own image, and with the images
shuffled within the batch (every caption then describes another scene). The gap is what the image is worth to the
model: ~0 means it has learned the captions' language and nothing of the pictures, however low its loss.

    python bench/looks.py runs/pretrain                     # its final/ and every checkpoint in checkpoints/
    python bench/looks.py runs/pretrain --data runs/packed --rows 64

The toy recipe's reason for its small fast steps (train.py PRESETS): with 96 steps of 16 rows the gap ended at
0.0015 (the image ignored); with steps of 8 rows at lr 3e-3 it opens after ~120 steps.
"""
import argparse
import glob
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import train  # noqa: E402


def mean_loss(net, rows, cfg, shuffle: bool, batch: int = 8) -> float:
    g, total, n = torch.Generator().manual_seed(0), 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            b = train.make_batch(rows[i:i + batch], cfg, net.config.vision.image_size, 0)
            px = b["pixels"][torch.randperm(len(b["pixels"]), generator=g)] if shuffle else b["pixels"]
            total += float(net(torch.as_tensor(b["input_ids"]), M.normalize_pixels(px), b["doc_lens"],
                               torch.as_tensor(b["targets"])))
            n += b["n_sup"]
    return total / max(1, n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a train.py run dir (final/ and checkpoints/)")
    ap.add_argument("--data", default="", help="packed rows; default: the run's --data")
    ap.add_argument("--rows", type=int, default=48, help="packed rows to average over")
    a = ap.parse_args()
    with open(M.need(os.path.join(a.run, "config.json"), "pass a train.py run dir")) as f:
        saved = json.load(f)["config"]
    data = a.data or saved["data"] or os.path.join(os.path.dirname(os.path.abspath(train.__file__)), "cache",
                                                   "toyworld", f"packed-{saved['seq_len']}-{saved['image_tokens']}")
    net = M.load_vlm(M.need(os.path.join(a.run, "final"), "the run has no final/ yet")).eval()
    cfg = train.Config(seq_len=saved["seq_len"], image_tokens=net.config.image_tokens)
    rows = train.Rows(M.need(data, "pass --data: the packed rows the run trained on (relative paths: from its cwd)"),
                      123).read(0, a.rows)
    points = sorted(p for p in glob.glob(os.path.join(a.run, "checkpoints", "step_*")) if not p.endswith(".tmp"))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    final = {k: t.clone() for k, t in net.state_dict().items()}
    for path in points + ["final"]:
        if path == "final":
            net.load_state_dict(final)
        else:  # a DCP checkpoint -> one torch file, then its model weights into the same VLM
            with tempfile.TemporaryDirectory() as tmp:
                dcp_to_torch_save(path, os.path.join(tmp, "ck.pt"))
                net.load_state_dict(torch.load(os.path.join(tmp, "ck.pt"), weights_only=True)["model"])
        right, shuffled = mean_loss(net, rows, cfg, False), mean_loss(net, rows, cfg, True)
        print(f"{os.path.basename(path):>14}  loss {right:.4f}  shuffled images {shuffled:.4f}  "
              f"gap {shuffled - right:+.4f}", flush=True)


if __name__ == "__main__":
    main()
