"""Evaluation building blocks: metrics (``metrics``) and an optional OCR reader (``ocr``, needs RapidOCR)."""
from .metrics import (
                      PSNR_CAP_DB,
                      char_error_rate,
                      codebook_stats,
                      corpus_cer,
                      edit_distance,
                      exact_match,
                      histogram,
                      mean_exact_match,
                      normalize_text,
                      psnr,
                      save_grid,
                      ssim,
                      stats_from_histogram,
                      to_uint8_images,
)
from .ocr import OCRReader, OCRUnavailable
from .ocr import available as ocr_available

__all__ = ["PSNR_CAP_DB", "char_error_rate", "codebook_stats", "corpus_cer", "edit_distance", "exact_match",
           "histogram", "mean_exact_match", "normalize_text", "psnr", "save_grid", "ssim", "stats_from_histogram",
           "to_uint8_images", "OCRReader", "OCRUnavailable", "ocr_available"]
