"""The document rule and mask builders of `blt_jax.masks`."""
import jax.numpy as jnp
import numpy as np

from blt_jax import masks

BOS, EOS = 1, 2


def test_documents_start_at_row_start_bos_and_after_eos():
  tokens = jnp.array([[7, 8, BOS, 9, EOS, BOS, 5, EOS, 6, 6],
                      [BOS, 5, 5, 5, 5, BOS, 5, EOS, EOS, 5]])
  np.testing.assert_array_equal(masks.document_starts(tokens),
                                [[1, 0, 1, 0, 0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1, 0, 0, 1, 1]])
  np.testing.assert_array_equal(masks.document_ids(tokens), [[0, 0, 1, 1, 1, 2, 2, 2, 3, 3],
                                                             [0, 0, 0, 0, 0, 1, 1, 1, 2, 3]])
  np.testing.assert_array_equal(masks.document_positions(tokens), [[0, 1, 0, 1, 2, 0, 1, 2, 0, 1],
                                                                   [0, 1, 2, 3, 4, 0, 1, 2, 0, 0]])


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
