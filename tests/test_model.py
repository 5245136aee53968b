"""DCAMA model (dcama/model.py): the head against a layer-by-layer, shot-by-shot reference at peaked attention,
what the attention op is given (positions, masks, head grouping), the skip connections, K-shot batching,
impls, training behaviour, autocast/compile, input validation, and the authors' released checkpoints
(checkpoint_filter_fn, infer_backbone, from_checkpoint). Small images so that it all runs on a CPU.

Random projections make the softmax almost uniform, and a uniform attention hides every fault that mixes
heads, positions or mask values (each output is then the mean of the mask whatever went wrong), so the
attention tests use weights scaled by helpers.PEAK_GAIN and assert that the attention is far from uniform.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import dcama.model as model_mod
from dcama import DCAMA
from dcama.backbones import BACKBONES
from dcama.checkpoint import CheckpointError, load_checkpoint_file, save_checkpoint, state_dict_mismatch
from dcama.model import StageAttention, checkpoint_filter_fn, infer_backbone
from helpers import (DEVICE, authors_state, episode, peaked_, peaked_stage_attention, randomise_,
                     stage_attention_reference)

SPEC_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "swin_b": (2, 2, 18, 2)}
SPEC_CHANNELS = {"resnet50": (256, 512, 1024, 2048), "resnet101": (256, 512, 1024, 2048),
                 "swin_b": (128, 256, 512, 1024)}


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return randomise_(DCAMA("resnet18", attn_impl="naive")).to(DEVICE).eval()


@pytest.fixture(scope="module")
def peaked():
    """ResNet-18 DCAMA whose attention is far from uniform (the fault-finding tests use it)."""
    torch.manual_seed(0)
    return peaked_(randomise_(DCAMA("resnet18", attn_impl="naive"))).to(DEVICE).eval()


def _up(x, size):
    return F.interpolate(x, size, mode="bilinear", align_corners=True)


def reference_logits(model, query_img, support_imgs, support_masks, probs=None):
    """docs/model.md "What DCAMA computes", written layer by layer and shot by shot, with explicit softmax
    attention. `probs`, if a list, receives each layer's attention weights (B, 8, Nq, Nk)."""
    head, spec = model.head, model.backbone.spec
    batch, shots = support_imgs.shape[:2]
    q_feats = model.backbone(query_img)
    s_feats = [model.backbone(support_imgs[:, k]) for k in range(shots)]
    bounds = [0] + spec.stack_ids
    coarse = {}
    for idx in range(bounds[1], bounds[4]):
        stage = next(s for s in (1, 2, 3) if idx < bounds[s + 1])
        attn, pe = head.DCAMA_blocks[stage - 1], head.pe[stage - 1].pe
        _, ch, h, w = q_feats[idx].shape
        d = ch // 8
        q = attn.linears[0](q_feats[idx].flatten(2).transpose(1, 2) + pe[:, : h * w])
        # Every shot's positions start at 0.
        k = torch.cat([attn.linears[1](s[idx].flatten(2).transpose(1, 2) + pe[:, : h * w]) for s in s_feats], 1)
        v = torch.cat([_up(support_masks[:, j: j + 1], (h, w)).flatten(1) for j in range(shots)], 1)
        q = q.view(batch, h * w, 8, d).transpose(1, 2)
        k = k.view(batch, -1, 8, d).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        if probs is not None:
            probs.append(p)
        coarse.setdefault(stage, []).append((p @ v[:, None, :, None]).mean(1).view(batch, 1, h, w))
    m3, m2, m1 = (head.conv3(torch.cat(coarse[1], 1)), head.conv2(torch.cat(coarse[2], 1)),
                  head.conv1(torch.cat(coarse[3], 1)))
    mix = head.conv5(_up(head.conv4(_up(m1, m2.shape[-2:]) + m2), m3.shape[-2:]) + m3)
    l2, l1 = bounds[2] - 1, bounds[1] - 1
    mix = torch.cat((mix, q_feats[l2], torch.stack([s[l2] for s in s_feats]).max(0).values), 1)
    mix = _up(mix, (mix.shape[-1] * 2,) * 2)
    mix = torch.cat((mix, q_feats[l1], torch.stack([s[l1] for s in s_feats]).max(0).values), 1)
    out = head.mixer1(mix)
    out = head.mixer2(_up(out, (out.shape[-1] * 2,) * 2))
    return head.mixer3(_up(out, (out.shape[-1] * 2,) * 2))


@pytest.fixture
def op_calls(monkeypatch):
    """Records what every call of the attention op receives."""
    calls, real_op = [], model_mod.dcama_attention

    def spy(query, key, value, **kw):
        calls.append({"query": query, "key": key, "value": value, **kw})
        return real_op(query, key, value, **kw)

    monkeypatch.setattr(model_mod, "dcama_attention", spy)
    return calls


# --------------------------------------------------------------------------------- the head's math
def test_head_matches_layer_by_layer_reference_at_peaked_attention(peaked):
    inputs = episode(batch=2, shots=2, size=64, seed=1)
    probs = []
    with torch.no_grad():
        ref = reference_logits(peaked, *inputs, probs=probs)
        out = peaked(*inputs)
    # Far from uniform on every layer: the mean top weight of a row is many times 1/Nk.
    for p in probs:
        n_key = p.shape[-1]
        assert p.amax(-1).mean() > max(0.3, 3.0 / n_key), (n_key, p.amax(-1).mean())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_stage_attention_averages_each_layers_own_heads():
    module, query, support, mask = peaked_stage_attention(layers=3, channels=128, n_query=10, n_key=14)
    with torch.no_grad():
        out = module(query, support, mask, "naive")
        expected, probs = stage_attention_reference(module, query, support, mask)
    for p in probs:
        assert p.amax(-1).mean() > 0.5  # peaked: a wrong grouping of heads changes the answer
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_op_gets_positions_restarting_per_shot_and_bilinear_align_corners_masks(r18, op_calls):
    """The tokens the op receives carry positions 0..h*w-1 for the query and for every shot, and the value is
    each shot's mask resized bilinearly with align_corners=True."""
    query_img, support_imgs, support_masks = episode(batch=2, shots=3, size=64, seed=9)
    with torch.no_grad():
        r18(query_img, support_imgs, support_masks)
        q_feats = r18.backbone(query_img)
        s_feats = [r18.backbone(support_imgs[:, j]) for j in range(3)]
    bounds = [0] + r18.backbone.spec.stack_ids
    assert len(op_calls) == 3
    for stage, call in zip((1, 2, 3), op_calls):
        attn, pe = r18.head.DCAMA_blocks[stage - 1], r18.head.pe[stage - 1].pe
        blocks = range(bounds[stage], bounds[stage + 1])
        h, w = q_feats[blocks[0]].shape[-2:]

        def tokens(feat):
            return feat.flatten(2).transpose(1, 2) + pe[:, : h * w]

        with torch.no_grad():
            q = attn.linears[0](torch.stack([tokens(q_feats[i]) for i in blocks], dim=2))
            k = attn.linears[1](torch.cat([torch.stack([tokens(s[i]) for i in blocks], dim=2) for s in s_feats], 1))
        torch.testing.assert_close(call["query"], model_mod.split_heads(q, 8), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(call["key"], model_mod.split_heads(k, 8), rtol=1e-5, atol=1e-6)
        value = torch.cat([_up(support_masks[:, j: j + 1], (h, w)).flatten(1) for j in range(3)], dim=1)
        assert torch.equal(call["value"], value)


def test_skip_connections_merge_the_shots_by_max(r18):
    query_img, support_imgs, support_masks = episode(batch=2, shots=3, size=64, seed=10)
    seen = {}
    hook = r18.head.mixer1.register_forward_pre_hook(lambda module, args: seen.setdefault("mix", args[0]))
    try:
        with torch.no_grad():
            r18(query_img, support_imgs, support_masks)
            s_feats = [r18.backbone(support_imgs[:, j]) for j in range(3)]
    finally:
        hook.remove()
    bounds = [0] + r18.backbone.spec.stack_ids
    c1, c2 = r18.backbone.spec.channels[:2]
    last1, last2 = bounds[1] - 1, bounds[2] - 1
    mix = seen["mix"]  # [up(mix, query stage 2, support stage 2), query stage 1, support stage 1]
    merged1 = torch.stack([s[last1] for s in s_feats]).amax(dim=0)
    merged2 = _up(torch.stack([s[last2] for s in s_feats]).amax(dim=0), merged1.shape[-2:])
    assert torch.equal(mix[:, -c1:], merged1)
    torch.testing.assert_close(mix[:, -2 * c1 - c2: -2 * c1], merged2, rtol=1e-6, atol=1e-6)


def test_batch_of_episodes_equals_each_episode_alone(peaked):
    query, support, masks = episode(batch=2, shots=5, size=64, seed=2)
    with torch.no_grad():
        both = peaked(query, support, masks)
        for b in range(2):
            alone = peaked(query[b: b + 1], support[b: b + 1], masks[b: b + 1])
            torch.testing.assert_close(both[b: b + 1], alone, rtol=1e-4, atol=1e-5)


def test_attention_impls_agree(peaked):
    inputs = episode(batch=1, shots=2, size=64, seed=3)
    outs = {}
    try:
        for impl in ("naive", "sdpa", "triton"):
            peaked.attn_impl = impl
            with torch.no_grad():
                outs[impl] = peaked(*inputs)
    finally:
        peaked.attn_impl = "naive"
    scale = outs["naive"].abs().max().item()
    torch.testing.assert_close(outs["sdpa"], outs["naive"], rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(outs["triton"], outs["naive"], rtol=1e-4, atol=1e-5 * scale)


def test_one_projection_and_one_op_call_per_stage(op_calls):
    model = DCAMA("resnet34", attn_impl="sdpa").to(DEVICE)
    projections = []
    for block in model.head.DCAMA_blocks:
        for lin in block.linears:
            lin.register_forward_hook(lambda mod, args, out: projections.append(mod))
    query, support, masks = episode(batch=2, shots=3, size=32)
    for training in (False, True):  # eval: no dropout; training: p=0.5 on the attention weights
        op_calls.clear(), projections.clear()
        model.train(training)
        model(query, support, masks)
        assert len(projections) == 6 and len(set(map(id, projections))) == 6
        depths = BACKBONES["resnet34"].depths
        assert [c["query"].shape[2] for c in op_calls] == [8 * depths[1], 8 * depths[2], 8 * depths[3]]
        assert [c["value"].shape for c in op_calls] == [(2, 3 * 16), (2, 3 * 4), (2, 3 * 1)]  # one mask an episode
        assert all(c["dropout_p"] == (0.5 if training else 0.0) for c in op_calls)
        assert all(pe.dropout.p == 0.5 and pe.dropout.training == training for pe in model.head.pe)


# --------------------------------------------------------------------------------- shapes and modes
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_resnet_output_shapes(name):
    model = DCAMA(name, attn_impl="sdpa").to(DEVICE).eval()
    with torch.no_grad():
        for batch, shots in ((2 if name in ("resnet18", "resnet34") else 1, 1), (1, 5)):
            logits = model(*episode(batch=batch, shots=shots, size=32))
            assert logits.shape == (batch, 2, 32, 32)
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("shots", [1, 5])
def test_swin_output_shapes(swin32, shots):
    with torch.no_grad():
        logits = swin32(*episode(batch=1, shots=shots, size=32))
    assert logits.shape == (1, 2, 32, 32)
    assert torch.isfinite(logits).all()


def test_swin_published_head():
    with torch.device("meta"):  # structure only: no weights initialised
        model = DCAMA("swin_b", attn_impl="sdpa")
    assert model.head.mixer1[0].in_channels == 896
    assert [model.head.DCAMA_blocks[i].linears[0].in_features for i in range(3)] == [256, 512, 1024]


def test_dropout_only_in_training(r18):
    inputs = episode(batch=1, shots=1, size=32, seed=4)
    with torch.no_grad():
        assert torch.equal(r18(*inputs), r18(*inputs))
        r18.train()
        r18.attn_impl = "sdpa"
        try:
            a, b = r18(*inputs), r18(*inputs)
        finally:
            r18.eval()
            r18.attn_impl = "naive"
    assert not torch.allclose(a, b)


def test_gradients_reach_head_never_backbone():
    model = DCAMA("resnet18", attn_impl="sdpa").to(DEVICE)
    model.train()
    assert not model.backbone.training and model.head.training
    stats = model.backbone.net.bn1.running_mean.clone()
    query, support, masks = episode(batch=2, shots=2, size=64, seed=5)
    target = masks[:, 0].long()
    loss = F.cross_entropy(model(query, support, masks), target)
    loss.backward()
    for name, p in model.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.backbone.parameters())
    assert torch.equal(model.backbone.net.bn1.running_mean, stats)


def test_predict_resizes_logits_before_argmax(r18):
    inputs = episode(batch=2, shots=1, size=32, seed=6)
    with torch.no_grad():
        logits = r18(*inputs)
    pred = r18.predict(*inputs)
    assert pred.dtype == torch.long and pred.shape == (2, 32, 32)
    assert torch.equal(pred, logits.argmax(1))
    resized = r18.predict(*inputs, out_size=(50, 70))
    expected = F.interpolate(logits, (50, 70), mode="bilinear", align_corners=True).argmax(1)
    assert resized.shape == (2, 50, 70) and torch.equal(resized, expected)
    assert set(resized.unique().tolist()) <= {0, 1}


def test_bf16_autocast(r18):
    inputs = episode(batch=1, shots=2, size=64, seed=7)
    with torch.no_grad():
        ref = r18(*inputs)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = r18(*inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = DCAMA("resnet18", attn_impl="sdpa").to(DEVICE).eval()
    inputs = episode(batch=1, shots=2, size=32, seed=8)
    eager = model(*inputs)
    torch._dynamo.reset()
    # backend="eager" checks that the whole forward traces as one graph without paying for code generation.
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    out = compiled(*inputs)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    F.cross_entropy(out, inputs[2][:, 0].long()).backward()
    assert model.head.mixer3[2].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------- input validation
def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown backbone"):
        DCAMA("vgg16")
    with pytest.raises(ValueError, match="attn_impl"):
        DCAMA("resnet18", attn_impl="flash")
    with pytest.raises(ValueError, match="split into 8 heads"):
        StageAttention(100)


def test_config_rebuilds_model(r18):
    assert r18.config == {"backbone": "resnet18", "attn_impl": "naive", "backbone_weights": None, "img_size": None}
    assert DCAMA(**r18.config).config == r18.config


def _bad_inputs():
    q, s, m = episode(batch=2, shots=2, size=64)
    return {
        "mask size": ((q, s, m[..., :32, :32]), "support masks"),
        "K mismatch": ((q, s, m[:, :1]), "2 support images but 1 support masks"),
        "batch mismatch": ((q[:1], s, m), "batch sizes differ"),
        "support rank": ((q, s[:, 0], m), "support_imgs must be"),
        "mask rank": ((q, s, m[:, 0]), "support_masks must be"),
        "query rank": ((q[0], s, m), "query_img must be"),
        "channels": ((q[:, :1], s, m), "query_img must be"),
        "support size": ((q, s[..., :32, :32], m), "support images are"),
        "non-square": ((q[..., :32], s[..., :32], m[..., :32]), "square"),
        "too small": ((q[..., :16, :16], s[..., :16, :16], m[..., :16, :16]), "multiple of 32"),
        "no shots": ((q, s[:, :0], m[:, :0]), "K >= 1"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_input_errors(r18, case):
    args, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        r18(*args)


# --------------------------------------------------------------------------------- checkpoints
def spec_head_keys(name):
    """The head keys of the authors' layout (docs/model.md), with their shapes."""
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


def test_own_checkpoint_round_trip(tmp_path, r18):
    inputs = episode(batch=2, shots=2, size=32)
    with torch.no_grad():
        ref = r18(*inputs)
    path = tmp_path / "model.pt"
    save_checkpoint(path, r18, extra={"epoch": 3})
    loaded = DCAMA.from_checkpoint(path, attn_impl="sdpa").to(DEVICE)
    assert not loaded.training and loaded.config == {**r18.config, "attn_impl": "sdpa"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="holds a resnet18 model, not the resnet34 backbone asked for"):
        DCAMA.from_checkpoint(path, backbone="resnet34")


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
    # With the positional encodings the head computes (not stored; the authors' files hold them).
    own = {**{k: v for k, v in swin32.named_buffers() if k.startswith("head.pe.")}, **swin32.state_dict()}
    assert converted.keys() == own.keys()
    for k, v in own.items():
        assert torch.equal(converted[k], v), k


def test_authors_swin_file_that_does_not_convert_names_the_tensor(swin32):
    # timm's converter fails with its own text (an index error deep in a resize): the message is the project's,
    # naming the file, the tensor and the shapes.
    state = authors_state(swin32)
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    state[f"module.feature_extractor.{table}"] = torch.zeros(7, 5, 3)
    with pytest.raises(CheckpointError) as info:
        checkpoint_filter_fn(state, swin32, "authors.pt")
    own = tuple(swin32.state_dict()[f"backbone.net.{table}"].shape)
    assert str(info.value) == (f"the backbone weights in 'authors.pt' do not fit swin_b: {table} (7, 5, 3) cannot "
                               f"be resized to this model's {own}")
    assert info.value.__suppress_context__  # no chained timm traceback


@pytest.mark.parametrize("name", ["swin_b", "resnet101", "resnet50"])
def test_authors_key_layout_matches_the_documented_one(name):
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
    assert state_dict_mismatch(model, checkpoint_filter_fn(state, model)) == ""


def test_authors_file_without_module_prefix_and_resnet18_inference(tmp_path, r18):
    state = {k[len("module."):]: v for k, v in authors_state(r18).items()}
    path = tmp_path / "plain.pt"
    torch.save(state, path)
    assert DCAMA.from_checkpoint(path).config["backbone"] == "resnet18"


def test_checkpoint_errors_name_the_problem(tmp_path, r18):
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="neither"):
        DCAMA.from_checkpoint(other, backbone="resnet18")
    path = tmp_path / "saved.pt"
    save_checkpoint(path, r18)
    blob = load_checkpoint_file(path)
    blob["state_dict"]["head.extra_layer.weight"] = blob["state_dict"].pop("head.mixer3.2.weight")
    torch.save(blob, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"1 missing keys: head\.mixer3\.2\.weight.*"
                                              r"1 unexpected keys: head\.extra_layer\.weight"):
        DCAMA.from_checkpoint(tmp_path / "edited.pt")
    authors = authors_state(r18)
    authors["module.model.conv1.0.weight"] = torch.zeros(16, 5, 3, 3)
    torch.save(authors, tmp_path / "authors.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches.*head\.conv1\.0\.weight \(16, 5, 3, 3\)"):
        DCAMA.from_checkpoint(tmp_path / "authors.pt")
