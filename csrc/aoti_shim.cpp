// A C interface over torch::inductor::AOTIModelPackageLoader, the C++ runtime for
// AOTInductor packages (.pt2), which tch does not bind. Tensors cross as `at::Tensor*`, the
// same handles libtch uses, so Rust passes `Tensor::as_ptr()` in and takes ownership of what
// comes out with `Tensor::from_ptr()`.
//
// No C++ exception may unwind into Rust: every entry point catches everything and returns the
// message through `error` (malloc'd; the caller frees it with vs_free).

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/Tensor.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>

namespace {

char* copy_string(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, text.c_str(), text.size() + 1);
  }
  return out;
}

// Runs `body`; on an exception stores its message in *error and returns false.
template <typename F>
bool guarded(char** error, F&& body) {
  try {
    body();
    return true;
  } catch (const std::exception& e) {
    *error = copy_string(e.what());
  } catch (...) {
    *error = copy_string("unknown C++ exception");
  }
  return false;
}

}  // namespace

extern "C" {

// The libtorch version the binary was built against, for example "2.13.0".
const char* vs_torch_version() { return TORCH_VERSION; }

void vs_free(void* pointer) { std::free(pointer); }

// The package's metadata as "key\tvalue\n" lines, read from the archive without loading its
// compiled code (so a package for another CPU can be refused before it runs).
char* vs_aoti_metadata(const char* path, char** error) {
  char* out = nullptr;
  guarded(error, [&] {
    auto metadata = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
    std::string lines;
    for (const auto& [key, value] : metadata) {
      lines += key + "\t" + value + "\n";
    }
    out = copy_string(lines);
  });
  return out;
}

// Loads one model of a package ("model", or another name the package holds) with
// `num_runners` model instances (concurrent run calls share them).
void* vs_aoti_load(const char* path, const char* model_name, int device_index, size_t num_runners, char** error) {
  torch::inductor::AOTIModelPackageLoader* loader = nullptr;
  guarded(error, [&] {
    loader = new torch::inductor::AOTIModelPackageLoader(
        path, model_name, /*run_single_threaded=*/false, num_runners,
        static_cast<c10::DeviceIndex>(device_index));
  });
  return loader;
}

// Runs the model. On success *outputs is a malloc'd array of *count new tensors, each owned
// by the caller; the array itself is freed with vs_free.
bool vs_aoti_run(void* handle, at::Tensor* const* inputs, size_t input_count, at::Tensor*** outputs,
                 size_t* count, char** error) {
  return guarded(error, [&] {
    auto* loader = static_cast<torch::inductor::AOTIModelPackageLoader*>(handle);
    std::vector<at::Tensor> args;
    args.reserve(input_count);
    for (size_t i = 0; i < input_count; ++i) {
      args.push_back(*inputs[i]);
    }
    std::vector<at::Tensor> results = loader->run(args);
    auto** array = static_cast<at::Tensor**>(std::malloc(sizeof(at::Tensor*) * (results.size() + 1)));
    if (array == nullptr) {
      throw std::bad_alloc();
    }
    for (size_t i = 0; i < results.size(); ++i) {
      array[i] = new at::Tensor(std::move(results[i]));
    }
    *outputs = array;
    *count = results.size();
  });
}

void vs_aoti_free(void* handle) {
  char* ignored = nullptr;
  guarded(&ignored, [&] { delete static_cast<torch::inductor::AOTIModelPackageLoader*>(handle); });
  std::free(ignored);
}

}  // extern "C"
