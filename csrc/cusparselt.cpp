// cuSPARSELt glue. cusparseLtGetProperty needs no handle, hence no GPU: the version can be reported (and the
// link proven real) on any machine where the library loads.
#include <cusparseLt.h>

#include <c10/util/Exception.h>

#include <utility>

#include "ops.h"

namespace madtp {

int64_t cusparselt_version() {
  int major = 0, minor = 0, patch = 0;
  for (auto [prop, out] : {std::pair{MAJOR_VERSION, &major}, std::pair{MINOR_VERSION, &minor},
                           std::pair{PATCH_LEVEL, &patch}}) {
    const cusparseStatus_t status = cusparseLtGetProperty(prop, out);
    TORCH_CHECK(status == CUSPARSE_STATUS_SUCCESS, "cusparseLtGetProperty failed: ", cusparseLtGetErrorString(status));
  }
  return int64_t{major} * 1000 + minor * 100 + patch;
}

}  // namespace madtp
