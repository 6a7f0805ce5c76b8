"""Run by tests/test_interop_formats.py with the peers' Python (torch, eai-sparsify, dictionary-learning;
never saekit's), in a folder WORK:

    python tests/peer_formats.py WORK

(a) loads each folder WORK/saekit/NAME (saekit's exports; NAME starts with the format) with its
    library's own loader and writes the library's codes and reconstructions of WORK/inputs.safetensors
    (x) to WORK/codes/NAME.safetensors;
(b) makes each library save dictionaries of its own into WORK/peers/NAME (sparsify: SparseCoders,
    freshly initialised, with biases moved off zero as training would; dictionary_learning: every
    trainer class, briefly trained by trainSAE), with their codes in WORK/codes/NAME.safetensors.

Codes are dense (batch, n) tensors. For dictionary_learning's AutoEncoder both ways of loading it
are recorded: load_dictionary (which rescales the decoder columns to unit norm, and the codes with
them) as codes_loader / x_hat_loader, and the weights as saved (normalize_decoder=False).
"""

import sys
from pathlib import Path

import safetensors.torch
import torch


def sparsify_codes(folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(folder)
    with torch.no_grad():
        top_acts, top_indices, _ = sae.encode(x.to(sae.dtype))
        codes = torch.zeros(x.shape[0], sae.num_latents, dtype=sae.dtype).scatter(1, top_indices, top_acts)
        return {"codes": codes, "x_hat": sae.decode(top_acts, top_indices)}


def dictionary_learning_codes(folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from dictionary_learning.dictionary import AutoEncoder
    from dictionary_learning.utils import load_dictionary

    ae, config = load_dictionary(str(folder), device="cpu")
    with torch.no_grad():
        codes = ae.encode(x.float())
        result = {"codes": codes, "x_hat": ae.decode(codes)}
        if config["trainer"]["dict_class"] == "AutoEncoder":
            result = {"codes_loader": result["codes"], "x_hat_loader": result["x_hat"]}
            ae = AutoEncoder.from_pretrained(str(folder / "ae.pt"), normalize_decoder=False)
            codes = ae.encode(x.float())
            result |= {"codes": codes, "x_hat": ae.decode(codes)}
    return result


def make_sparsify(peers: Path, d: int) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    variants = {
        "sparsify-num-latents": SparseCoderConfig(num_latents=24, k=3),
        "sparsify-expansion-factor-multi-topk": SparseCoderConfig(expansion_factor=2, k=4, multi_topk=True),
    }
    for i, (name, cfg) in enumerate(variants.items()):
        torch.manual_seed(i)
        sae = SparseCoder(d, cfg)
        with torch.no_grad():  # initialised at zero; training moves them
            sae.encoder.bias.normal_(0, 0.3)
            sae.b_dec.normal_(0, 1)
        sae.save_to_disk(peers / name)


def make_dictionary_learning(peers: Path, d: int) -> None:
    from dictionary_learning.trainers import BatchTopKTrainer, JumpReluTrainer, StandardTrainer, TopKTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate
    from dictionary_learning.training import trainSAE

    steps, n, k = 20, 32, 4
    common = dict(steps=steps, activation_dim=d, dict_size=n, layer=0, lm_name="toy", device="cpu", seed=0)
    warm = dict(warmup_steps=0, sparsity_warmup_steps=0)
    topk = dict(k=k, warmup_steps=0, threshold_start_step=0)  # the threshold estimated from the first step
    trainers = {
        "AutoEncoder": dict(trainer=StandardTrainer, **common, **warm),
        "AutoEncoder-april-update": dict(trainer=StandardTrainerAprilUpdate, **common, **warm),
        "AutoEncoderTopK": dict(trainer=TopKTrainer, **common, **topk),
        "BatchTopKSAE": dict(trainer=BatchTopKTrainer, **common, **topk),
        "JumpReluAutoEncoder": dict(trainer=JumpReluTrainer, **common, **warm),
        "MatryoshkaBatchTopKSAE": dict(
            trainer=MatryoshkaBatchTopKTrainer, **common, **topk, group_fractions=[0.25, 0.75]
        ),
    }
    g = torch.Generator().manual_seed(0)
    offset = torch.randn(d, generator=g)
    data = iter([torch.randn(64, d, generator=g) * 2 + offset for _ in range(steps + 1)])
    trainSAE(data, list(trainers.values()), steps, save_dir=str(peers / "dictionary_learning"), device="cpu")
    for i, name in enumerate(trainers):
        (peers / "dictionary_learning" / f"trainer_{i}").rename(peers / f"dictionary-learning-{name}")


def main(work: Path) -> None:
    x = safetensors.torch.load_file(work / "inputs.safetensors")["x"]
    peers = work / "peers"
    make_sparsify(peers, x.shape[1])
    make_dictionary_learning(peers, x.shape[1])
    (work / "codes").mkdir()
    for folder in sorted([*(work / "saekit").iterdir(), *peers.glob("*-*")]):
        read = sparsify_codes if folder.name.startswith("sparsify") else dictionary_learning_codes
        result = {name: t.contiguous() for name, t in read(folder, x).items()}
        safetensors.torch.save_file(result, work / "codes" / f"{folder.parent.name}-{folder.name}.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
