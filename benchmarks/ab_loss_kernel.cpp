// In-process A/B of two builds of csrc/tcsm_loss.cpp: the base build is compiled with its
// namespace renamed to tcsm_base (ab_loss_kernel.py does this), both are linked here, and
// timed calls alternate on the same buffers, one thread, so that both see the same machine
// state. On a shared, noisy CPU this resolves differences of a few percent that separate
// processes (compare_cpu_kernels.py) cannot.
//
//   ab_loss_kernel ROWS COLS [--rounds R] [--target data|dense] [--objective distrib|score]
//                  [--divergence kl|is|gkl] [--inplace]
//
// Prints per build the best and median rate (elements per second) over the rounds, the median
// of the per-round new / base time ratios, and the largest relative difference of the losses.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tcsm_loss.h"

namespace tcsm_base {
// The base build's own LossProblem; ab_loss_kernel.py checks that both builds declare it
// identically, so a tcsm::LossProblem is passed for it.
struct LossProblem;
void tcsm_loss(const LossProblem& problem);
}  // namespace tcsm_base

namespace {

struct Options {
  int64_t rows = 0, cols = 0;
  int rounds = 30;
  bool dense = true;
  bool score = false;
  bool inplace = false;
  tcsm::Divergence divergence = tcsm::Divergence::kGKL;
};

[[noreturn]] void usage(const char* message) {
  std::fprintf(stderr,
               "error: %s\nusage: ab_loss_kernel ROWS COLS [--rounds R] [--target data|dense] "
               "[--divergence kl|is|gkl] [--inplace]\n",
               message);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  if (argc < 3) usage("ROWS and COLS are required");
  Options options;
  options.rows = std::atoll(argv[1]);
  options.cols = std::atoll(argv[2]);
  if (options.rows <= 0 || options.cols <= 0) usage("ROWS and COLS must be positive");
  for (int i = 3; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage((arg + " needs a value").c_str());
      return argv[++i];
    };
    if (arg == "--rounds") {
      options.rounds = std::atoi(value().c_str());
      if (options.rounds <= 0) usage("--rounds must be positive");
    } else if (arg == "--target") {
      const std::string target = value();
      if (target != "data" && target != "dense") usage("--target is data or dense");
      options.dense = target == "dense";
    } else if (arg == "--objective") {
      const std::string objective = value();
      if (objective != "distrib" && objective != "score") usage("--objective is distrib or score");
      options.score = objective == "score";
    } else if (arg == "--divergence") {
      const std::string name = value();
      if (name == "kl") {
        options.divergence = tcsm::Divergence::kKL;
      } else if (name == "is") {
        options.divergence = tcsm::Divergence::kIS;
      } else if (name == "gkl") {
        options.divergence = tcsm::Divergence::kGKL;
      } else {
        usage("--divergence is kl, is or gkl");
      }
    } else if (arg == "--inplace") {
      options.inplace = true;
    } else {
      usage(("unknown option " + arg).c_str());
    }
  }
  if (options.score && (!options.dense || options.divergence == tcsm::Divergence::kKL)) {
    usage("--objective score needs --target dense and --divergence is or gkl");
  }
  return options;
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  const int64_t elements = options.rows * options.cols;
  std::mt19937 generator(0);
  std::normal_distribution<float> normal(0.f, 3.f);
  std::vector<float> logits(elements), teacher(elements), grad(elements);
  for (float& x : logits) x = normal(generator);
  for (float& x : teacher) x = normal(generator);
  std::vector<int64_t> target(options.rows);
  for (int64_t& t : target) t = static_cast<int64_t>(generator() % options.cols);
  std::vector<float> loss_new(options.rows), loss_base(options.rows);

  tcsm::LossProblem problem{};
  problem.storage = tcsm::StorageDtype::kFloat32;
  problem.rows = options.rows;
  problem.cols = options.cols;
  problem.logits = options.inplace ? grad.data() : logits.data();
  problem.logits_row_stride = options.cols;
  problem.target = target.data();
  problem.teacher_logits = options.dense ? teacher.data() : nullptr;
  problem.teacher_row_stride = options.cols;
  problem.grad = grad.data();
  problem.grad_row_stride = options.cols;
  problem.divergence = options.divergence;
  problem.objective = options.score ? tcsm::Objective::kScore : tcsm::Objective::kDistrib;
  problem.tail = tcsm::Tail::kZero;
  problem.mask_id = -1;
  problem.temperature = 1.f;
  problem.ignore_index = -100;
  problem.max_log_ratio = 30.f;
  problem.threads = 1;
  tcsm::LossProblem problem_base = problem;
  problem.loss = loss_new.data();
  problem_base.loss = loss_base.data();

  // In place, the logits are restored before every call, untimed.
  const auto restore = [&] {
    if (options.inplace) std::memcpy(grad.data(), logits.data(), sizeof(float) * elements);
  };
  const auto call_new = [&] { tcsm::tcsm_loss(problem); };
  const auto call_base = [&] {
    tcsm_base::tcsm_loss(reinterpret_cast<const tcsm_base::LossProblem&>(problem_base));
  };
  const int calls = static_cast<int>(std::max<int64_t>(1, 20'000'000 / elements));
  const auto seconds_per_call = [&](const auto& call) {
    double total = 0.0;
    for (int c = 0; c < calls; ++c) {
      restore();
      const auto start = std::chrono::steady_clock::now();
      call();
      total += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    return total / calls;
  };

  restore();
  call_new();
  restore();
  call_base();
  double loss_difference = 0.0;
  for (int64_t n = 0; n < options.rows; ++n) {
    const double scale = std::max(std::abs(static_cast<double>(loss_base[n])), 1e-30);
    loss_difference = std::max(loss_difference, std::abs(loss_new[n] - loss_base[n]) / scale);
  }
  std::vector<double> base_times, new_times, ratios;
  for (int round = 0; round < options.rounds; ++round) {
    base_times.push_back(seconds_per_call(call_base));
    new_times.push_back(seconds_per_call(call_new));
    ratios.push_back(new_times.back() / base_times.back());
  }
  const auto rate = [&](double seconds) { return static_cast<double>(elements) / seconds / 1e9; };
  std::printf(
      "rows %lld cols %lld, %s, one thread, %d rounds x %d calls\n"
      "base: best %.3f, median %.3f G elements/s\n"
      "new:  best %.3f, median %.3f G elements/s\n"
      "new / base time: median of per-round ratios %.3f, best-to-best %.3f\n"
      "largest relative loss difference %.2e\n",
      static_cast<long long>(options.rows), static_cast<long long>(options.cols),
      !options.dense ? "data target" : options.score ? "dense teacher, score" : "dense teacher, distrib",
      options.rounds, calls,
      rate(*std::min_element(base_times.begin(), base_times.end())), rate(median(base_times)),
      rate(*std::min_element(new_times.begin(), new_times.end())), rate(median(new_times)),
      median(ratios),
      *std::min_element(new_times.begin(), new_times.end()) /
          *std::min_element(base_times.begin(), base_times.end()),
      loss_difference);
  return 0;
}
