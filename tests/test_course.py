"""The classic course's entry points, called with the course's own inputs and checks.
(Their argument checks are in test_errors.py.)"""
import pytest
import torch

from conftest import COURSE, course_call, course_reference


def course_qkv(N, d, B, H):
    """The course's createQKVSimple, vectorised: K is a transposed view of a (B, H, d, N) tensor."""
    i = torch.arange(N, dtype=torch.float32)[:, None]
    j = torch.arange(d, dtype=torch.float32)[None, :]
    Q = (0.0002 * i + 0.0001 * j).expand(B, H, N, d).clone()
    K = (0.0006 * i + 0.0003 * j).T.expand(B, H, d, N).contiguous().transpose(-2, -1)
    V = (0.00015 * i + 0.0008 * j).expand(B, H, N, d).clone()
    return Q, K, V


@pytest.mark.parametrize("entry", COURSE)
def test_course_inputs_at_course_size(ext, entry):
    N, d, B, H = 1024, 32, 1, 4
    Q, K, V = course_qkv(N, d, B, H)
    assert K.stride(-1) != 1
    out = course_call(ext.extension(), entry, Q, K, V, B, H, N, d)
    expected = course_reference(Q, K, V)
    assert torch.allclose(expected, out, atol=1e-4)  # the course's own check
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("br,bc", [(256, 256), (100, 37), (1, 3), (2000, 5), (64, 1024)])
def test_course_flash_tiles(ext, br, bc):
    N, d, B, H = 300, 20, 2, 3
    Q, K, V = course_qkv(N, d, B, H)
    Q = Q + torch.randn_like(Q)  # make rows differ in more than a linear ramp
    out = course_call(ext.extension(), "myFlashAttention", Q, K, V, B, H, N, d, br=br, bc=bc)
    torch.testing.assert_close(out, course_reference(Q, K, V), rtol=1e-5, atol=1e-5)
