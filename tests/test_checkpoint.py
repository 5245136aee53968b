"""Checkpoints: this project's round trip, the authors' released layout (spec section 4), the ImageNet
backbone files, and clear errors for files that are missing, corrupt or do not fit."""

import os
import re

import pytest
import torch

import dcama.checkpoint as ckpt
from dcama import DCAMA
from dcama.checkpoint import CheckpointError, load_checkpoint_file, save_checkpoint
from dcama.model import checkpoint_filter_fn, infer_backbone
from test_model import episode, randomise_

SPEC_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "swin_b": (2, 2, 18, 2)}
SPEC_CHANNELS = {"resnet50": (256, 512, 1024, 2048), "resnet101": (256, 512, 1024, 2048),
                 "swin_b": (128, 256, 512, 1024)}


def microsoft_swin_state(net):
    """timm Swin weights in Microsoft's layout: patch merging at the end of the previous stage, plus the
    relative_position_index and attn_mask buffers and the ImageNet classifier."""
    out = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
           for k, v in net.state_dict().items()}
    for i, stage in enumerate(net.layers):
        for j, block in enumerate(stage.blocks):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = block.attn.relative_position_index
            if block.attn_mask is not None:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = block.attn_mask
    out["head.weight"] = torch.zeros(1000, net.num_features, device=out["norm.weight"].device)
    out["head.bias"] = torch.zeros(1000, device=out["norm.weight"].device)
    return out


def torchvision_resnet_state(net):
    """timm ResNet weights as torchvision/timm files hold them, classifier included."""
    out = dict(net.state_dict())
    out["fc.weight"] = torch.zeros(1000, net.num_features, device=out["conv1.weight"].device)
    out["fc.bias"] = torch.zeros(1000, device=out["conv1.weight"].device)
    return out


def authors_state(model):
    """What the authors' DDP-wrapped training saved for this model's weights."""
    net = model.backbone.net
    backbone = microsoft_swin_state(net) if model.backbone.spec.kind == "swin" else torchvision_resnet_state(net)
    out = {f"module.feature_extractor.{k}": v for k, v in backbone.items()}
    out.update({f"module.model.{k[len('head.'):]}": v for k, v in model.state_dict().items() if k.startswith("head.")})
    return out


def spec_head_keys(name):
    """The head keys spec section 4 lists, with their shapes."""
    c, d = SPEC_CHANNELS[name], SPEC_DEPTHS[name]
    keys = {}
    for i in range(3):
        for j in range(2):
            keys[f"model.DCAMA_blocks.{i}.linears.{j}.weight"] = (c[i + 1], c[i + 1])
            keys[f"model.DCAMA_blocks.{i}.linears.{j}.bias"] = (c[i + 1],)
        keys[f"model.pe.{i}.pe"] = (1, 10000, c[i + 1])
    first_in = {1: d[3], 2: d[2], 3: d[1], 4: 128, 5: 128}
    out_ch = {1: (16, 64, 128), 2: (16, 64, 128), 3: (16, 64, 128), 4: (128,) * 3, 5: (128,) * 3}
    kernel = {1: (3, 3, 3), 2: (5, 3, 3), 3: (5, 5, 3), 4: (3, 3, 3), 5: (3, 3, 3)}
    for n in range(1, 6):
        in_ch = first_in[n]
        for layer, (o, k) in enumerate(zip(out_ch[n], kernel[n])):
            keys[f"model.conv{n}.{3 * layer}.weight"] = (o, in_ch, k, k)
            keys[f"model.conv{n}.{3 * layer}.bias"] = (o,)
            keys[f"model.conv{n}.{3 * layer + 1}.weight"] = (o,)
            keys[f"model.conv{n}.{3 * layer + 1}.bias"] = (o,)
            in_ch = o
    mixer = {1: (128 + 2 * c[1] + 2 * c[0], 128, 64), 2: (64, 64, 16), 3: (16, 16, 2)}
    for n, (i, m, o) in mixer.items():
        keys.update({f"model.mixer{n}.0.weight": (m, i, 3, 3), f"model.mixer{n}.0.bias": (m,),
                     f"model.mixer{n}.2.weight": (o, m, 3, 3), f"model.mixer{n}.2.bias": (o,)})
    return keys


@pytest.fixture(scope="module")
def swin32():
    # A small Swin (32x32 input) so that it runs; the key layout is the same as at 384.
    torch.manual_seed(0)
    return randomise_(DCAMA("swin_b", attn_impl="sdpa", img_size=32)).eval()


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return randomise_(DCAMA("resnet18", attn_impl="sdpa")).eval()


def test_round_trip_with_extra(tmp_path, r18):
    inputs = episode(batch=2, shots=2, size=32, device="cpu")
    with torch.no_grad():
        ref = r18(*inputs)
    opt = torch.optim.SGD([p for p in r18.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, r18, extra={"epoch": 3, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()})
    assert os.listdir(path.parent) == ["model.pt"]  # the temporary file was renamed, none left behind
    blob = load_checkpoint_file(path)
    assert blob["format"] == "dcama-triton" and blob["version"] == 1 and blob["epoch"] == 3
    assert blob["config"] == r18.config and "optimizer" in blob and "rng" in blob
    loaded = DCAMA.from_checkpoint(path, attn_impl="naive")
    assert not loaded.training and loaded.config == {**r18.config, "attn_impl": "naive"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="holds a resnet18 model, not resnet34"):
        DCAMA.from_checkpoint(path, backbone="resnet34")


def test_save_is_atomic(tmp_path, r18, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, r18, extra={"epoch": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, r18, extra={"epoch": 2})
    assert os.listdir(tmp_path) == ["model.pt"]
    monkeypatch.undo()
    assert load_checkpoint_file(path)["epoch"] == 1


def test_save_rejects_reserved_extra(tmp_path, r18):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "m.pt", r18, extra={"state_dict": {}})


def test_authors_resnet50_checkpoint_reproduces_logits(tmp_path):
    torch.manual_seed(0)
    model = randomise_(DCAMA("resnet50", attn_impl="sdpa")).eval()
    inputs = episode(batch=1, shots=2, size=32, device="cpu")
    with torch.no_grad():
        ref = model(*inputs)
    path = tmp_path / "res50.pt"
    # PyTorch 1.5 (the authors' version) wrote the legacy, non-zip format.
    torch.save(authors_state(model), path, _use_new_zipfile_serialization=False)
    loaded = DCAMA.from_checkpoint(path)  # backbone inferred from the keys
    assert loaded.config["backbone"] == "resnet50"
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), ref, rtol=1e-5, atol=1e-6)


def test_authors_swin_layout_converts_values(swin32):
    state = authors_state(swin32)
    assert infer_backbone(state) == "swin_b"
    converted = checkpoint_filter_fn(state, swin32)
    own = swin32.state_dict()
    assert converted.keys() == own.keys()
    for k, v in own.items():
        assert torch.equal(converted[k], v), k


@pytest.mark.parametrize("name", ["swin_b", "resnet101", "resnet50"])
def test_authors_key_layout_matches_spec(name):
    with torch.device("meta"):  # the published sizes, shapes only
        model = DCAMA(name)
    state = authors_state(model)
    assert all(k.startswith(("module.feature_extractor.", "module.model.")) for k in state)
    head = {k[len("module."):]: tuple(v.shape) for k, v in state.items() if k.startswith("module.model.")}
    assert head == spec_head_keys(name)
    backbone = {k[len("module.feature_extractor."):]: tuple(v.shape) for k, v in state.items()
                if k.startswith("module.feature_extractor.")}
    if name == "swin_b":
        assert backbone["patch_embed.proj.weight"] == (128, 3, 4, 4)
        assert [f"layers.{i}.downsample.reduction.weight" in backbone for i in range(4)] == [True] * 3 + [False]
        assert backbone["layers.0.blocks.1.attn_mask"] == (64, 144, 144)  # 8x8 windows of 12x12 at 96x96
        assert backbone["layers.2.blocks.17.attn.relative_position_index"] == (144, 144)
        assert backbone["layers.2.blocks.17.attn.relative_position_bias_table"] == (529, 16)
        assert "layers.3.blocks.1.attn_mask" not in backbone  # 12x12 grid: one window, no shift
        assert sum(k.endswith("attn_mask") for k in backbone) == 1 + 1 + 9
    else:
        assert backbone["layer1.0.conv3.weight"] == (256, 64, 1, 1)
        assert f"layer3.{SPEC_DEPTHS[name][2] - 1}.bn3.running_var" in backbone
        assert f"layer3.{SPEC_DEPTHS[name][2]}.conv1.weight" not in backbone
    assert infer_backbone(state) == name
    converted = checkpoint_filter_fn(state, model)
    assert ckpt.state_dict_mismatch(model, converted) == ""


def test_authors_file_without_module_prefix_and_resnet18_inference(tmp_path, r18):
    state = {k[len("module."):]: v for k, v in authors_state(r18).items()}
    path = tmp_path / "plain.pt"
    torch.save(state, path)
    assert DCAMA.from_checkpoint(path).config["backbone"] == "resnet18"


def test_backbone_weights_timm_resnet(tmp_path, r18):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet_state(r18.backbone.net), path)
    model = DCAMA("resnet18", backbone_weights=path)
    assert model.config["backbone_weights"] == str(path)
    for k, v in r18.backbone.net.state_dict().items():
        assert torch.equal(model.backbone.net.state_dict()[k], v), k
    with pytest.raises(ValueError, match="resnet34.*missing keys"):
        DCAMA("resnet34", backbone_weights=path)


def test_backbone_weights_microsoft_swin(tmp_path, swin32):
    net = swin32.backbone.net
    path = tmp_path / "swin.pth"
    torch.save({"model": microsoft_swin_state(net)}, path)
    # Spoil a few tensors (one of them renamed by the conversion), then reload the file over them.
    names = ["patch_embed.proj.weight", "layers.1.downsample.reduction.weight", "layers.2.blocks.5.attn.qkv.weight"]
    saved = {k: net.state_dict()[k].clone() for k in names}
    with torch.no_grad():
        for k in names:
            net.state_dict()[k].zero_()
    swin32.backbone.load_pretrained(path)
    for k in names:
        assert torch.equal(net.state_dict()[k], saved[k]), k
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="swin_base_patch4_window12_384_22kto1k.pth"):
        swin32.backbone.load_pretrained(bad)


def test_backbone_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="resnet50_a1h-35c100f8.pth"):
        DCAMA("resnet50", backbone_weights=tmp_path / "missing.pth")


def test_checkpoint_file_errors(tmp_path, r18):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        DCAMA.from_checkpoint(tmp_path / "nothing.pt")
    path = tmp_path / "model.pt"
    save_checkpoint(path, r18)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.*truncated, corrupt"):
        DCAMA.from_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint_file(garbage)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint_file(tensor)
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="neither"):
        DCAMA.from_checkpoint(other, backbone="resnet18")


def test_mismatched_keys_are_listed(tmp_path, r18):
    blob = load_checkpoint_file(_saved(tmp_path, r18))
    state = blob["state_dict"]
    state["head.extra_layer.weight"] = state.pop("head.mixer3.2.weight")
    torch.save(blob, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"1 missing keys: head\.mixer3\.2\.weight.*"
                                              r"1 unexpected keys: head\.extra_layer\.weight"):
        DCAMA.from_checkpoint(tmp_path / "edited.pt")
    authors = authors_state(r18)
    authors["module.model.conv1.0.weight"] = torch.zeros(16, 5, 3, 3)
    torch.save(authors, tmp_path / "authors.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches.*head\.conv1\.0\.weight \(16, 5, 3, 3\)"):
        DCAMA.from_checkpoint(tmp_path / "authors.pt")


def _saved(tmp_path, model):
    path = tmp_path / "saved.pt"
    save_checkpoint(path, model)
    return path
