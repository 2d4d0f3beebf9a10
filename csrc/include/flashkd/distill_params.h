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

  void* grad = nullptr;              // dtype = student_dtype; may alias student
  RowLayout grad_layout;
  const float* grad_scale = nullptr; // device/host scalar multiplying every gradient, or null

  float* loss = nullptr;             // [rows] per-token loss (weighted, 0 when ignored)
  float* stats = nullptr;            // [rows, kNumStats] or null
  bool* agree = nullptr;             // [rows] or null (with stats)

  Divergence divergence = Divergence::kFKL;
  DivergenceConsts consts;
  float inv_temperature = 1.f;
  float hard_weight = 0.f;           // CE weight (needs labels)
  float soft_weight = 1.f;           // divergence weight, T^2 already folded in
};

}  // namespace flashkd
