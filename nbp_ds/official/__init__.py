"""The NBP authors' released models (RenShuhuai-Andy/NBP): reading their files, converting their generators.

* Tokenizers ``magvit2_ucf.pt`` / ``magvit2_k600.pt``: an exact port in nbp_ds.tokenizer.official, loaded
  by ``load_tokenizer("official:PATH")``.
* Generators (Lightning ``.ckpt``, UCF-101 class-conditional and Kinetics-600 frame prediction, 700M / 3B):
  ``convert_generator`` (nbp-convert-official) writes them in the export format of
  nbp_ds.weights.export, as a ``model.arch: gpt2`` model (nbp_ds.model.gpt2) with the layout options that
  reproduce their sequences (nbp_ds.layout).
"""

from nbp_ds.official.files import ConversionError, read_torch_file

__all__ = ["ConversionError", "read_torch_file"]
