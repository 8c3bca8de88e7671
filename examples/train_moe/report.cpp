#include "report.hpp"

#include "moefold/train/mfu.hpp"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>

#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold::train_demo {

namespace {

std::string clock_time(double seconds) {
  auto const s = static_cast<long>(std::max(0.0, seconds) + 0.5);
  return s >= 3600 ? fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
                   : fmt::format("{}:{:02}", s / 60, s % 60);
}

std::string rate(double tokens_per_s) {
  return tokens_per_s >= 1e4 ? fmt::format("{:.1f}k", tokens_per_s / 1e3)
                             : fmt::format("{:.0f}", tokens_per_s);
}

}  // namespace

namespace {

constexpr char const* kCsvHeader =
    "step,loss,aux_loss,validation_loss,lr,grad_norm,seconds,tokens_per_s";

[[noreturn]] void file_error(char const* what, std::filesystem::path const& file, int err) {
  throw error(errc::invalid_argument,
              fmt::format("cannot {} '{}': {}", what, file.string(), std::strerror(err)));
}

/// The step a line of loss.csv (`12,…`) or of --log-json (`{"step": 12, …`) is about.
std::optional<std::int64_t> step_of(std::string const& line) {
  auto const at = line.rfind("{\"step\": ", 0) == 0 ? std::string::size_type{9} : 0;
  std::int64_t step = 0;
  auto const [end, ec] = std::from_chars(line.data() + at, line.data() + line.size(), step);
  if (ec != std::errc() || end == line.data() + at) return std::nullopt;
  return step;
}

/// Opens `file` for this run: a fresh run (`first_step` 0) starts it anew; a resumed run keeps
/// its lines about steps ≤ `first_step` (and the CSV header) and appends. Returns the lines kept.
std::vector<std::string> open_log(std::ofstream& out, std::filesystem::path const& file,
                                  std::int64_t first_step, char const* header) {
  std::vector<std::string> kept;
  if (first_step > 0) {
    std::ifstream in(file);
    if (!in && std::filesystem::exists(file)) file_error("read", file, errno);
    for (std::string line; std::getline(in, line);) {
      auto const step = step_of(line);
      if (step ? *step <= first_step : header != nullptr && line == header) kept.push_back(line);
    }
    if (in.bad()) file_error("read", file, errno);
  }
  out.open(file, std::ios::trunc);
  if (!out) file_error("write", file, errno);
  if (header != nullptr && (kept.empty() || kept.front() != header))
    kept.insert(kept.begin(), header);
  for (auto const& line : kept) out << line << '\n';
  out.flush();
  if (!out) file_error("write", file, errno);
  return kept;
}

/// A JSON number, or null for NaN and infinities (which JSON cannot spell).
std::string json_number(double x, char const* format) {
  return std::isfinite(x) ? fmt::format(fmt::runtime(format), x) : std::string("null");
}

double number(std::string const& field) {
  return field.empty() ? std::nan("") : std::strtod(field.c_str(), nullptr);
}

}  // namespace

void Report::start(std::string const& banner, std::int64_t first_step) {
  first_step_ = first_step;
  std::error_code ec;
  std::filesystem::create_directories(o_.output_dir, ec);
  if (ec)
    throw error(errc::invalid_argument,
                fmt::format("cannot create --output-dir '{}': {}", o_.output_dir, ec.message()));
  csv_path_ = std::filesystem::path(o_.output_dir) / "loss.csv";
  // The kept rows of a resumed run also draw the curve.
  for (auto const& line : open_log(csv_, csv_path_, first_step, kCsvHeader)) {
    if (line == kCsvHeader) continue;
    std::vector<std::string> f;
    std::stringstream fields(line);
    for (std::string x; std::getline(fields, x, ',');) f.push_back(x);
    f.resize(8);
    Row row;
    row.step.step = *step_of(line), row.step.loss = number(f[1]), row.step.aux_loss = number(f[2]);
    if (!f[3].empty()) row.validation_loss = number(f[3]);
    rows_.push_back(row);
  }
  if (!o_.log_json.empty()) open_log(json_, o_.log_json, first_step, nullptr);
  fmt::print("{}", banner);
  std::fflush(stdout);
}

void Report::step(StepRecord const& r, double elapsed) {
  if (row_pending_) write_row();
  rows_.push_back({r, std::nullopt});
  row_pending_ = true;
  if (json_.is_open()) {
    json_ << fmt::format(
        "{{\"step\": {}, \"loss\": {}, \"aux_loss\": {}, \"tokens_per_s\": {}, \"lr\": {}, "
        "\"grad_norm\": {}, \"seconds\": {}, \"cpu_s\": {}}}\n",
        r.step, json_number(r.loss, "{:.17g}"), json_number(r.aux_loss, "{:.17g}"),
        json_number(r.tokens_per_s, "{:.6g}"), json_number(r.lr, "{:.9g}"),
        json_number(r.grad_norm, "{:.9g}"), json_number(r.seconds, "{:.6g}"),
        json_number(r.cpu_seconds, "{:.6g}"));
    json_.flush();
    if (!json_) file_error("write --log-json", o_.log_json, errno);
  }
  if (o_.quiet) return;
  auto const done = static_cast<double>(r.step - first_step_);
  auto const left = static_cast<double>(o_.train_iters - r.step);
  std::string traffic;
  for (std::size_t g = 0; g < kTrafficGroups.size(); ++g)
    if (r.megabytes[g] > 0)
      traffic += fmt::format(" {} {:.2f}", kTrafficGroups[g].first, r.megabytes[g]);
  fmt::print("step {:>{}}/{} | loss {:.4f} | aux {:.4f} | {} tok/s | elapsed {} | ETA {} |{}{}\n",
             r.step, fmt::formatted_size("{}", o_.train_iters), o_.train_iters, r.loss, r.aux_loss,
             rate(r.tokens_per_s), clock_time(elapsed), clock_time(elapsed / done * left),
             traffic.empty() ? " no traffic" : " MB", traffic);
  std::fflush(stdout);
}

void Report::write_row() {
  auto const& [r, val] = rows_.back();
  csv_ << fmt::format("{},{:.6f},{:.6f},{},{:.6g},{:.6g},{:.4f},{:.1f}\n", r.step, r.loss,
                      r.aux_loss, val ? fmt::format("{:.6f}", *val) : "", r.lr, r.grad_norm,
                      r.seconds, r.tokens_per_s);
  csv_.flush();
  if (!csv_) file_error("write", csv_path_, errno);
  row_pending_ = false;
}

void Report::validation(std::int64_t step, double loss) {
  if (row_pending_ && rows_.back().step.step == step) rows_.back().validation_loss = loss;
  if (!o_.quiet)
    fmt::print("validation at step {}: loss {:.4f}\n", step, loss), std::fflush(stdout);
}

void Report::checkpoint(std::int64_t step, std::string const& dir) {
  if (!o_.quiet) fmt::print("saved checkpoint of step {} in {}\n", step, dir), std::fflush(stdout);
}

namespace {
/// Bytes as "12.34 MiB (12939264 B)".
std::string mib(std::int64_t bytes) {
  return fmt::format("{:.2f} MiB ({} B)", static_cast<double>(bytes) / (1024.0 * 1024.0), bytes);
}
}  // namespace

void Report::finish(Summary const& s) {
  if (row_pending_) write_row();
  csv_.close();
  if (!rows_.empty()) write_svg(s.unigram_entropy);
  write_memory_json(s.memory);
  std::string validation =
      s.final_val_loss && o_.tokenizer_type != "bytes"
          ? fmt::format("  validation loss      {:.4f} nats per token\n", *s.final_val_loss)
      : s.final_val_loss
          ? fmt::format("  validation loss      {:.4f}   byte-unigram entropy {:.4f} nats: {}\n",
                        *s.final_val_loss, s.unigram_entropy,
                        *s.final_val_loss < s.unigram_entropy ? "beats the baseline"
                                                              : "does NOT beat the baseline")
          : std::string("  validation           none (--eval-iters 0)\n");
  // Bits per byte: comparable between byte-level and SentencePiece runs (and with the baseline).
  double const ln2 = std::log(2.0);
  std::string const per_byte =
      !s.final_val_loss ? std::string()
      : o_.tokenizer_type == "bytes"
          ? fmt::format("  bits per byte        {:.4f}   byte-unigram entropy {:.4f} bits\n",
                        *s.final_val_loss / ln2, s.unigram_entropy / ln2)
          : fmt::format(
                "  bits per byte        {:.4f}   byte-unigram entropy {:.4f} bits: {} "
                "({:.3f} bytes per token; the loss above is per token)\n",
                *s.final_val_loss / ln2 / s.bytes_per_token, s.unigram_entropy / ln2,
                *s.final_val_loss / s.bytes_per_token < s.unigram_entropy
                    ? "beats the baseline"
                    : "does NOT beat the baseline",
                s.bytes_per_token);
  validation += per_byte;
  if (s.steps == 0) {
    fmt::print(
        "\nsummary\n"
        "  no step to run: the checkpoint is at step {} >= --train-iters {}\n"
        "{}",
        first_step_, o_.train_iters, validation);
    std::fflush(stdout);
    return;
  }
  double const steps = static_cast<double>(s.steps);
  auto pct = [&](double t) { return s.train_seconds > 0 ? 100.0 * t / s.train_seconds : 0.0; };
  PhaseTimes const& p = s.phases;
  double const attention = std::max(0.0, p.compute - p.mlp);
  double const experts = std::max(0.0, p.mlp - p.dispatch - p.combine);
  double const wait = std::max(0.0, p.pipeline - p.compute);
  std::string throughput;
  if (s.train_seconds > 0 && s.gemm_peak_per_rank > 0) {
    Mfu const m = mfu(s.model_flops_per_step * steps, s.train_seconds, s.ranks,
                      s.gemm_peak_per_rank);
    throughput = fmt::format(
        "  throughput           {:.3f} GFLOP/s per rank ({:.3f} GFLOP per step by Megatron's "
        "formula)\n"
        "  MFU                  {:.1f}% of {:.3f} GFLOP/s per rank (an fp32 GEMM on every rank's "
        "instance at once, at start-up)\n",
        m.flops_per_rank / 1e9, s.model_flops_per_step / 1e9, 100.0 * m.ratio,
        m.peak_per_rank / 1e9);
  }
  fmt::print(
      "\nsummary\n"
      "  final train loss     {:.4f} (step {})\n"
      "{}"
      "  training time        {:.1f} s for {} steps ({:.2f} s/step), {} tokens/s; validation "
      "{:.1f} s\n"
      "{}"
      "  memory per rank      parameters {}, gradients {}, optimizer state {} ({}; the "
      "largest rank)\n"
      "  time per phase       (mean over ranks, per step)\n"
      "    attention          {:7.1f} ms  {:5.1f}%  (embedding, norms, attention, output layer, "
      "loss)\n"
      "    dispatch           {:7.1f} ms  {:5.1f}%\n"
      "    experts            {:7.1f} ms  {:5.1f}%\n"
      "    combine            {:7.1f} ms  {:5.1f}%\n"
      "    pipeline wait      {:7.1f} ms  {:5.1f}%\n"
      "    grad sync + AdamW  {:7.1f} ms  {:5.1f}%\n"
      "  loss curve           {}/loss.svg, {}/loss.csv\n",
      s.final_train_loss, rows_.back().step.step, validation, s.train_seconds, s.steps,
      s.train_seconds / steps,
      rate(s.train_seconds > 0 ? static_cast<double>(s.tokens) / s.train_seconds : 0.0),
      s.eval_seconds, throughput, mib(s.memory.parameters), mib(s.memory.gradients), mib(s.memory.optimizer),
      std::string(o_.bf16 ? "bf16 parameters; FP32 gradients, moments and main parameters; "
                          : "") +
          (o_.use_distributed_optimizer
               ? fmt::format("distributed optimizer, {} instance{}",
                             o_.num_distributed_optimizer_instances,
                             o_.num_distributed_optimizer_instances > 1 ? "s" : "")
               : std::string("AdamW state on every replica")),
      1e3 * attention / steps, pct(attention), 1e3 * p.dispatch / steps,
      pct(p.dispatch), 1e3 * experts / steps, pct(experts), 1e3 * p.combine / steps, pct(p.combine),
      1e3 * wait / steps, pct(wait), 1e3 * p.optimizer / steps, pct(p.optimizer), o_.output_dir,
      o_.output_dir);
  std::fflush(stdout);
}

void Report::write_memory_json(MemoryBytes const& m) const {
  std::string ranks;
  for (std::size_t r = 0; r < m.per_rank.size(); ++r)
    ranks += fmt::format(
        "{}\n    {{\"rank\": {}, \"pp_rank\": {}, \"parameters\": {}, \"gradients\": {}, "
        "\"optimizer\": {}}}",
        r == 0 ? "" : ",", r, m.per_rank[r][0], m.per_rank[r][1], m.per_rank[r][2],
        m.per_rank[r][3]);
  auto const file = std::filesystem::path(o_.output_dir) / "memory.json";
  std::ofstream out(file, std::ios::trunc);
  out << fmt::format(
      "{{\"world_size\": {}, \"tp\": {}, \"cp\": {}, \"pp\": {}, \"ep\": {}, \"etp\": {}, "
      "\"use_distributed_optimizer\": {}, \"num_distributed_optimizer_instances\": {},\n"
      "  \"ranks\": [{}]}}\n",
      o_.world, o_.tp, o_.cp, o_.pp, o_.ep, o_.etp, o_.use_distributed_optimizer,
      o_.num_distributed_optimizer_instances, ranks);
  out.flush();
  if (!out) file_error("write", file, errno);
}

void Report::write_svg(double baseline) const {
  double const w = 720, h = 420, left = 60, right = 20, top = 30, bottom = 50;
  double lo = baseline, hi = baseline;
  for (auto const& [r, val] : rows_) {
    if (std::isfinite(r.loss)) lo = std::min(lo, r.loss), hi = std::max(hi, r.loss);
    if (val && std::isfinite(*val)) lo = std::min(lo, *val), hi = std::max(hi, *val);
  }
  lo = std::floor(lo * 2) / 2, hi = std::ceil(hi * 2) / 2;
  if (hi <= lo) hi = lo + 1;
  double const s0 = static_cast<double>(rows_.empty() ? 0 : rows_.front().step.step - 1);
  double const s1 = static_cast<double>(std::max<std::int64_t>(o_.train_iters, 1));
  auto x = [&](double step) {
    return left + (step - s0) / std::max(s1 - s0, 1.0) * (w - left - right);
  };
  auto y = [&](double loss) { return top + (hi - loss) / (hi - lo) * (h - top - bottom); };
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{0}\" height=\"{1}\" "
      "fill=\"white\"/>\n<text x=\"{2}\" y=\"18\" font-size=\"14\">moefold-train: loss per step "
      "(TP{3}·CP{4}·PP{5}·DP{6} / EP{7}·ETP{8})</text>\n",
      w, h, left, o_.tp, o_.cp, o_.pp, o_.dp(), o_.ep, o_.etp);
  for (double v = lo; v <= hi + 1e-9; v += 0.5)
    svg += fmt::format(
        "<line x1=\"{0}\" x2=\"{1}\" y1=\"{2:.1f}\" y2=\"{2:.1f}\" stroke=\"#ddd\"/><text "
        "x=\"{3}\" "
        "y=\"{4:.1f}\" text-anchor=\"end\">{5:.1f}</text>\n",
        left, w - right, y(v), left - 6, y(v) + 4, v);
  svg += fmt::format(
      "<line x1=\"{0}\" x2=\"{0}\" y1=\"{1}\" y2=\"{2}\" stroke=\"black\"/><line x1=\"{0}\" "
      "x2=\"{3}\" y1=\"{2}\" y2=\"{2}\" stroke=\"black\"/>\n<text x=\"{4}\" y=\"{5}\" "
      "text-anchor=\"middle\">step (of {6})</text>\n<text x=\"14\" y=\"{7}\" "
      "transform=\"rotate(-90 14 {7})\" text-anchor=\"middle\">loss (nats per byte)</text>\n",
      left, top, h - bottom, w - right, (left + w - right) / 2, h - 12, o_.train_iters,
      (top + h - bottom) / 2);
  for (int k = 0; k <= 4; ++k) {
    double const step = s0 + (s1 - s0) * k / 4.0;
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{:.0f}</text>\n",
                       x(step), h - bottom + 16, step);
  }
  svg += fmt::format(
      "<line x1=\"{0}\" x2=\"{1}\" y1=\"{2:.1f}\" y2=\"{2:.1f}\" stroke=\"#c33\" "
      "stroke-dasharray=\"6 4\"/><text x=\"{1}\" y=\"{3:.1f}\" text-anchor=\"end\" "
      "fill=\"#c33\">byte-unigram entropy {4:.3f}</text>\n",
      left, w - right, y(baseline), y(baseline) - 5, baseline);
  std::string points;
  for (auto const& [r, val] : rows_)
    if (std::isfinite(r.loss))
      points += fmt::format("{:.1f},{:.1f} ", x(static_cast<double>(r.step)), y(r.loss));
  svg += fmt::format(
      "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" "
      "points=\"{}\"/>\n",
      points);
  for (auto const& [r, val] : rows_)
    if (val && std::isfinite(*val))
      svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"4\" fill=\"#ff7f0e\"/>\n",
                         x(static_cast<double>(r.step)), y(*val));
  svg += fmt::format(
      "<text x=\"{0}\" y=\"{1}\" fill=\"#1f77b4\">train loss</text><text x=\"{0}\" y=\"{2}\" "
      "fill=\"#ff7f0e\">validation loss</text>\n</svg>\n",
      w - right - 130, top + 16, top + 32);
  auto const file = std::filesystem::path(o_.output_dir) / "loss.svg";
  std::ofstream out(file, std::ios::trunc);
  out << svg;
  out.flush();
  if (!out) file_error("write", file, errno);
}

}  // namespace moefold::train_demo
