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


# ---------------------------------------------------------------------------------------
# The warm-up's accessors, as the harness's 4Daccess test calls them


def test_four_dim_read_as_the_harness_calls_it(ext):
    B, H, N, d = 1, 2, 4, 4  # the harness's accessTest(1, 2, 4, 4)
    Q, _, _ = course_qkv(N, d, B, H)
    flat = Q.flatten().tolist()
    for b in range(B):
        for h in range(H):
            for i in range(N):
                for j in range(d):
                    assert ext.extension().fourDimRead(flat, b, h, i, j, H, N, d) == Q[b][h][i][j].item()


def test_accessors_address_row_major(ext):
    m = ext.extension()
    t = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    flat = t.flatten().tolist()
    assert m.fourDimRead(flat, 1, 2, 4, 6, 3, 5, 7) == t[1, 2, 4, 6].item()
    assert m.fourDimRead(flat, 1, 0, 3, 2, 3, 5, 7) == t[1, 0, 3, 2].item()
    assert m.twoDimRead(flat, 4, 5, 7) == t.reshape(-1, 7)[4, 5].item()
    m.fourDimWrite(flat, 1, 2, 3, 4, 3, 5, 7, -1.5)  # writes go into the caller's list
    m.twoDimWrite(flat, 2, 6, 7, 9.25)
    t[1, 2, 3, 4] = -1.5
    t.reshape(-1, 7)[2, 6] = 9.25
    assert flat == t.flatten().tolist()


@pytest.mark.parametrize("args,exc,match", [
    ((0, 0, 0, 7, 3, 5, 7), IndexError, r"b=7 is outside \[0, sizeZ=7\)"),
    ((0, 3, 0, 0, 3, 5, 7), IndexError, r"y=3 is outside \[0, sizeX=3\)"),
    ((0, 0, -1, 0, 3, 5, 7), IndexError, r"z=-1 is outside"),
    ((2, 0, 0, 0, 3, 5, 7), IndexError, r"past the end of a tensor of 210 elements"),
    ((-1, 0, 0, 0, 3, 5, 7), IndexError, r"x must be non-negative"),
    ((0, 0, 0, 0, 3, 0, 7), ValueError, r"sizeY must be at least 1"),
    ((1, 0, 0, 0, 2**62, 2**62, 2**62), IndexError, r"past the end"),  # no wrap-around into range
])
def test_accessors_check_indices(ext, args, exc, match):
    flat = [0.0] * 210
    with pytest.raises(exc, match=match):
        ext.extension().fourDimRead(flat, *args)
    with pytest.raises(exc, match=match):
        ext.extension().fourDimWrite(flat, *args, 1.0)
    assert flat == [0.0] * 210


def test_two_dim_checks_indices(ext):
    with pytest.raises(IndexError, match=r"y=4 is outside \[0, sizeX=4\)"):
        ext.extension().twoDimRead([0.0] * 8, 0, 4, 4)
    with pytest.raises(IndexError, match="past the end"):
        ext.extension().twoDimWrite([0.0] * 8, 2, 0, 4, 1.0)
