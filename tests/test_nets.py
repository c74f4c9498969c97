import numpy as np
import pytest
import torch

from maisi2 import nets
from maisi2.checkpoint import build_network
from maisi2.config import get_config


def _read_tsv(path):
    rows = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        rows[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return rows


@pytest.mark.parametrize("kind, tsv", [("vae", "autoencoder"), ("unet", "unet"), ("controlnet", "controlnet")])
def test_maisi_v2_state_dicts_equal_the_released_keys_and_shapes(kind, tsv, reference_dir):
    expected = _read_tsv(reference_dir / f"state_dict_keys_{tsv}.tsv")
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_network(kind, get_config("maisi-v2"))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected


def test_controlnet_from_unet_copies_all_but_the_spacing_sized_projections():
    with torch.device("meta"):
        cfg = get_config("maisi-v2")
        unet, controlnet = nets.build_unet(cfg), nets.build_controlnet(cfg)
    src, dst = unet.state_dict(), controlnet.state_dict()
    same = [k for k in dst if k in src and src[k].shape == dst[k].shape]
    assert (len(same), len(dst)) == (180, 231)  # DESIGN.md: 13 time_emb_proj differ, the rest are new


def _unzero(module, seed=0):
    """MONAI zero-initialises output convolutions; give every weight a little signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module


def test_tiny_networks_run_with_controlnet_residuals():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    vae, unet, controlnet = nets.build_vae(cfg), _unzero(nets.build_unet(cfg)), nets.build_controlnet(cfg)
    image = torch.rand(2, 1, 32, 32, 32)
    recon, mu, sigma = vae(image)
    assert recon.shape == image.shape and mu.shape == (2, 4, 8, 8, 8)
    copied, total = nets.controlnet_from_unet(controlnet, unet)
    assert 0 < copied < total
    labels = torch.randint(0, 201, (2, 1, 32, 32, 32))
    cond = nets.Conditioning(spacing=torch.tensor([[1.5, 1.5, 2.0]] * 2), modality=torch.tensor([1, 1]),
                             mask_bits=nets.mask_to_bitplanes(labels))
    t = torch.tensor([999.0, 10.0])
    v_plain = nets.predict_velocity(unet, mu, t, cond)
    v_ctrl = nets.predict_velocity(unet, mu, t, cond, controlnet=controlnet)
    assert v_plain.shape == v_ctrl.shape == mu.shape
    # ControlNet output convolutions start at zero, so residuals are zero until it is trained
    assert torch.allclose(v_plain, v_ctrl)
    _unzero(controlnet, seed=1)
    assert not torch.allclose(v_plain, nets.predict_velocity(unet, mu, t, cond, controlnet=controlnet))


def test_spacing_changes_the_prediction():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    unet = _unzero(nets.build_unet(cfg))
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([500.0])
    a = nets.predict_velocity(unet, x, t, nets.Conditioning(torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([1])))
    b = nets.predict_velocity(unet, x, t, nets.Conditioning(torch.tensor([[2.0, 2.0, 5.0]]), torch.tensor([1])))
    assert not torch.allclose(a, b)


def test_mask_bitplanes_are_lsb_first_and_reversible():
    labels = torch.tensor([0, 1, 2, 23, 128, 200, 255]).view(1, 1, 7, 1, 1)
    bits = nets.mask_to_bitplanes(labels)
    assert bits.shape == (1, 8, 7, 1, 1)
    assert bits[0, :, 1].flatten().tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    weights = (2 ** torch.arange(8)).view(1, 8, 1, 1, 1).float()
    assert torch.equal((bits * weights).sum(1, keepdim=True).long(), labels)
    with pytest.raises(ValueError, match="0..255"):
        nets.mask_to_bitplanes(torch.tensor([300]).view(1, 1, 1, 1, 1))


def test_modality_ids_and_devices():
    assert nets.modality_id("ct") == 1
    with pytest.raises(ValueError, match="unknown modality"):
        nets.modality_id("xray")
    assert nets.resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            nets.resolve_device("cuda")


def test_a_precomputed_mask_embedding_gives_the_same_velocity():
    """The ControlNet's mask encoder run once (`embed_mask`) and fed to its trunk = the full call."""
    cfg = get_config("tiny")
    torch.manual_seed(0)
    unet, controlnet = _unzero(nets.build_unet(cfg)), _unzero(nets.build_controlnet(cfg), seed=1)
    labels = torch.randint(0, 201, (1, 1, 32, 32, 32))
    cond = nets.Conditioning(torch.tensor([[1.5, 1.5, 2.0]]), torch.tensor([1]), nets.mask_to_bitplanes(labels))
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([400.0])
    with torch.no_grad():
        want = nets.predict_velocity(unet, x, t, cond, controlnet, control_scale=0.7)
        embedded = nets.embed_mask(controlnet, cond)
        assert embedded.mask_embedding.shape == (1, cfg.unet.num_channels[0], 8, 8, 8)
        got = nets.predict_velocity(unet, x, t, embedded, controlnet, control_scale=0.7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert embedded.to("cpu").mask_embedding is not None
    with pytest.raises(ValueError, match="bit-planes"):
        nets.embed_mask(controlnet, nets.Conditioning(cond.spacing, cond.modality))


def test_condition_on_builds_what_the_networks_take():
    labels = np.random.default_rng(0).integers(0, 133, (8, 6, 4)).astype(np.int16)
    cond = nets.condition_on(labels, (1.5, 2.0, 3.0))
    assert torch.equal(cond.mask_bits, nets.mask_to_bitplanes(torch.from_numpy(labels.astype(np.int64))[None, None]))
    assert torch.equal(cond.spacing, torch.tensor([[1.5, 2.0, 3.0]]))
    assert cond.modality.tolist() == [nets.modality_id("ct")] and cond.modality.dtype == torch.long
    batch = nets.condition_on(None, (4.0, 4.0, 4.0), modality="ct_contrast", batch=3)
    assert batch.mask_bits is None and batch.spacing.shape == (3, 3)
    assert batch.modality.tolist() == [nets.modality_id("ct_contrast")] * 3
