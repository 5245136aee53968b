"""Frozen backbones: per-block features (pre-ReLU ResNet blocks, every Swin block), the published
structures, input-size checks, and the ImageNet weight files the authors used (timm ResNet, Microsoft Swin)."""

import pytest
import timm
import torch

from dcama import DCAMA
from dcama.backbones import BACKBONES, STAGE_STRIDES, BlockFeatures, build_backbone
from dcama.checkpoint import CheckpointError
from helpers import DEVICE, microsoft_swin_state, randomise_, torchvision_resnet_state

SWIN_TEST_SIZE = 32


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 32)])
def test_resnet_features_are_pre_relu_block_outputs(name, size):
    torch.manual_seed(0)
    backbone = randomise_(BlockFeatures(name))
    plain = timm.create_model(name, pretrained=False, num_classes=0).eval()
    plain.load_state_dict(backbone.net.state_dict())
    img = torch.randn(2, 3, size, size)
    feats = backbone(img)
    spec = BACKBONES[name]
    assert len(feats) == sum(spec.depths)
    with torch.no_grad():
        x = plain.maxpool(plain.act1(plain.bn1(plain.conv1(img))))
        i = 0
        for s, stage in enumerate((plain.layer1, plain.layer2, plain.layer3, plain.layer4)):
            for block in stage:
                x = block(x)  # timm's own block, ReLU included
                side = max(size // STAGE_STRIDES[s], 1)
                assert feats[i].shape == (2, spec.channels[s], side, side)
                assert feats[i].min() < 0  # taken before the ReLU
                torch.testing.assert_close(torch.relu(feats[i]), x)
                i += 1


def test_swin_features_every_block(swin32):
    net = swin32.backbone.net
    img = torch.randn(1, 3, SWIN_TEST_SIZE, SWIN_TEST_SIZE, device=DEVICE)
    with torch.no_grad():
        feats = swin32.backbone(img)
        last = net.layers(net.patch_embed(img))  # timm's stages, before the final norm
    side = SWIN_TEST_SIZE // 4
    expected = [(c, side >> s) for s, (c, d) in enumerate(zip((128, 256, 512, 1024), (2, 2, 18, 2)))
                for _ in range(d)]
    assert [(f.shape[1], f.shape[2]) for f in feats] == expected
    torch.testing.assert_close(feats[-1], last.permute(0, 3, 1, 2))


def test_swin_published_config():
    with torch.device("meta"):  # structure only: no weights initialised
        backbone = BlockFeatures("swin_b")
    assert backbone.img_size == 384
    layers = backbone.net.layers
    assert [len(s.blocks) for s in layers] == [2, 2, 18, 2]
    assert [s.blocks[0].attn.num_heads for s in layers] == [4, 8, 16, 32]
    assert [s.blocks[0].window_size for s in layers] == [(12, 12)] * 4
    assert [s.blocks[1].shift_size for s in layers] == [(6, 6)] * 3 + [(0, 0)]  # 12x12 grid: no shift


def test_backbone_is_frozen_and_stays_in_eval_mode():
    backbone = BlockFeatures("resnet18").train()
    assert not backbone.training and not backbone.net.layer1[0].bn1.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_input_size_errors(swin32):
    with pytest.raises(ValueError, match="unknown backbone"):
        BlockFeatures("vgg16")
    with pytest.raises(ValueError, match="multiple of 32"):
        BlockFeatures("swin_b", img_size=100)
    with pytest.raises(ValueError, match="window"):
        BlockFeatures("swin_b", img_size=160)
    with pytest.raises(ValueError, match="multiple of 32"):
        BlockFeatures("resnet18", img_size=40)
    resnet = BlockFeatures("resnet18")
    for size, message in (((32, 64), "square"), ((16, 16), "multiple of 32"), ((48, 48), "multiple of 32")):
        with pytest.raises(ValueError, match=message):
            resnet.check_input_size(*size)
    with pytest.raises(ValueError, match=f"built for {SWIN_TEST_SIZE}x{SWIN_TEST_SIZE}"):
        swin32.backbone.check_input_size(64, 64)


def test_imagenet_weights_timm_resnet(tmp_path):
    torch.manual_seed(0)
    source = randomise_(BlockFeatures("resnet18"))
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet_state(source.net), path)
    loaded = build_backbone("resnet18", weights=path)
    for k, v in source.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[k], v), k
    assert DCAMA("resnet18", backbone_weights=path).config["backbone_weights"] == str(path)
    with pytest.raises(CheckpointError, match="resnet34.*missing keys"):
        build_backbone("resnet34", weights=path)


def test_imagenet_weights_microsoft_swin(tmp_path, swin32):
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
    with pytest.raises(CheckpointError, match="swin_base_patch4_window12_384_22kto1k.pth"):
        swin32.backbone.load_pretrained(bad)


def test_missing_weights_file_is_reported_before_the_network_is_built(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(BlockFeatures, "__init__", lambda *args, **kw: built.append(1))
    with pytest.raises(FileNotFoundError, match="missing.pth.*resnet50_a1h-35c100f8.pth"):
        build_backbone("resnet50", weights=tmp_path / "missing.pth")
    assert not built
