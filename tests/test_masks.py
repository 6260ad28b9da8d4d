"""The document rule and mask builders of `blt_jax.masks`."""

import jax.numpy as jnp
import numpy as np

from blt_jax import attention, masks

BOS, EOS = 1, 2


def test_documents_start_at_row_start_bos_and_after_eos():
  tokens = jnp.array([[7, 8, BOS, 9, EOS, BOS, 5, EOS, 6, 6], [BOS, 5, 5, 5, 5, BOS, 5, EOS, EOS, 5]])
  np.testing.assert_array_equal(
      masks.document_starts(tokens), [[1, 0, 1, 0, 0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1, 0, 0, 1, 1]]
  )
  np.testing.assert_array_equal(
      masks.document_ids(tokens), [[0, 0, 1, 1, 1, 2, 2, 2, 3, 3], [0, 0, 0, 0, 0, 1, 1, 1, 2, 3]]
  )
  np.testing.assert_array_equal(
      masks.document_positions(tokens), [[0, 1, 0, 1, 2, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2, 0, 0]]
  )


def test_eos_rule_of_the_reference_is_kept_for_bos_eos_documents():
  """`[BOS] bytes [EOS]` rows: a document ends at and including its EOS (spec 6.1)."""
  tokens = jnp.array([[BOS, 5, EOS, BOS, 6, EOS, 7]])
  np.testing.assert_array_equal(masks.document_ids(tokens), [[0, 0, 0, 1, 1, 1, 2]])


def test_context_segments_reset_from_each_document_start():
  tokens = jnp.array([[BOS] + [5] * 6 + [BOS] + [5] * 7])
  seg, pos = masks.context_segments(tokens, 3)
  np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 0, 1, 2, 0, 1]])
  np.testing.assert_array_equal(seg, [[0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 4, 4, 4, 5, 5]])


def test_patch_documents_and_positions():
  tokens = jnp.array([[BOS, 5, 6, EOS, BOS, 7, 8, 9, 0]])
  lengths = jnp.array([[1, 2, 1, 1, 3, 2, 0]])  # [BOS] [5 6] [EOS] [BOS] [7 8 9] [0 next] []
  doc_P = masks.patch_document_ids(masks.document_ids(tokens), lengths)
  np.testing.assert_array_equal(doc_P, [[0, 0, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(masks.patch_positions(doc_P), [[0, 1, 2, 0, 1, 2, 3]])


# Cross-attention windows worked by hand: 6 bytes in patches [0] [1 1] [2 2 2] (P = 3), k = 2 slots per patch.
PATCH_IDS = jnp.array([[0, 1, 1, 2, 2, 2]])
ENCODER_SEES = {  # patch p's slots see the bytes of patches p - w + 1 .. p
    None: [[1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]],
    2: [[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]],
    3: [[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]],
}
DECODER_IDS = jnp.array([[0, 0, 1, 1, 2, 2]])
DECODER_SEES = {  # byte i sees the slots of patches dpid(i) - w + 1 .. dpid(i)
    None: [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]],
    2: [[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0], [0, 1, 1], [0, 1, 1]],
}


def test_cross_attention_windows_by_hand():
  """The dense cross masks and the attention kernels against masks written out by hand. The kernels' visibility is
  read from their outputs: zero queries and keys give uniform weights over what a query sees, and one-hot values
  (one per key) show which keys those are."""
  k, P, N = 2, 3, 6
  for window, sees in ENCODER_SEES.items():
    want = np.repeat(np.asarray(sees, bool), k, axis=0)  # [P * k, N]
    np.testing.assert_array_equal(
        masks.dense_encoder_cross_mask(PATCH_IDS, P, k, window)[0], want, err_msg=f"window {window}"
    )
    out = attention.encoder_cross_attention(
        jnp.zeros((1, P * k, 1, N)), jnp.zeros((1, N, 1, N)), jnp.eye(N)[None, :, None, :], PATCH_IDS, P, k, window
    )
    np.testing.assert_allclose(out[0, :, 0], want / want.sum(-1, keepdims=True), atol=1e-6, err_msg=f"window {window}")
  for window, sees in DECODER_SEES.items():
    want = np.repeat(np.asarray(sees, bool), k, axis=1)  # [N, P * k]
    np.testing.assert_array_equal(
        masks.dense_decoder_cross_mask(DECODER_IDS, P, k, window)[0], want, err_msg=f"window {window}"
    )
    out = attention.decoder_cross_attention(
        jnp.zeros((1, N, 1, P * k)),
        jnp.zeros((1, P * k, 1, P * k)),
        jnp.eye(P * k)[None, :, None, :],
        DECODER_IDS,
        k,
        window,
    )
    np.testing.assert_allclose(out[0, :, 0], want / want.sum(-1, keepdims=True), atol=1e-6, err_msg=f"window {window}")
