// Everything a distillation row kernel needs, filled by csrc/ops/distill.cpp.
#pragma once
#include "flashkd/divergence.h"

namespace flashkd {

// Indices of the per-token statistics written when `stats` is non-null.
enum StatIndex : int32_t {
  kStatDivergence = 0,
  kStatStudentEntropy,
  kStatTeacherEntropy,
  kStatStudentLogprob,
  kStatTeacherLogprob,
  kNumStats
};

struct DistillParams {
  int64_t rows = 0;   // tokens
  int64_t cols = 0;   // columns of the logits (V)
  int64_t vocab = 0;  // columns that count (<= cols); the rest get zero gradient

  const void* student = nullptr;
  DType student_dtype = DType::kFloat32;
  RowLayout student_layout;
  const void* teacher = nullptr;
  DType teacher_dtype = DType::kFloat32;
  RowLayout teacher_layout;

  const int64_t* labels = nullptr;   // [rows] contiguous, or null
  const float* weights = nullptr;    // [rows] contiguous, or null
  int64_t ignore_index = -100;

  void* grad = nullptr;              // dtype = student_dtype; may alias student; null: loss (and stats) only
  RowLayout grad_layout;
  const float* grad_scale = nullptr; // scalar multiplying every gradient (same device), or null
  const float* row_scale = nullptr;  // [rows] per-token gradient multiplier, or null

  float* loss = nullptr;             // [rows] per-token loss (weighted, 0 when ignored)
  float* stats = nullptr;            // [rows, kNumStats] or null
  bool* agree = nullptr;             // [rows] or null (with stats)
  float* lse = nullptr;              // [rows] log-sum-exp of the (capped) student logits at T = 1, or null

  Divergence divergence = Divergence::kFKL;
  DivergenceConsts consts;
  float inv_temperature = 1.f;
  float hard_weight = 0.f;           // CE weight (needs labels)
  float soft_weight = 1.f;           // divergence weight, T^2 already folded in

  // Cross-entropy extras (DESIGN.md §2), all of the hard term at T = 1:
  // hard = (1 - eps) (lse - z_y) + eps (lse - mean z) + z_loss lse^2.
  float label_smoothing = 0.f;       // eps
  float z_loss = 0.f;
  float softcap = 0.f;               // > 0: student logits z -> softcap * tanh(z / softcap) first
};

}  // namespace flashkd
