// Out-of-band data planes (coordinator/data_plane.h ⇄ worker/data_plane.h) in one process: the shm
// plane's round trip and buffer layout, its cleanup, and every refusal of a bad or oversized
// negotiation, with its message. The end-to-end runs (moemesh-worker processes over shm, equal to
// gRPC and to the single process; a worker killed mid-request) are in test_cluster.cpp; cuda-ipc
// and nccl on a GPU in test_cuda_transport.cpp.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <random>

#include "coordinator/data_plane.h"
#include "worker/data_plane.h"

namespace moemesh {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kH = 48;

std::unique_ptr<LinkDataPlane> make_shm(int64_t rows) {
    auto p = LinkDataPlane::create(Transport::kShm, rows, kH, -1, -1, "t");
    EXPECT_TRUE(p.ok()) << p.status().message();
    return p.ok() ? std::move(p).value() : nullptr;
}

TEST(ShmPlane, RoundTripBothDirections) {
    auto link = make_shm(8);
    ASSERT_TRUE(link);
    const v1::DataPlaneOffer& o = link->offer();
    EXPECT_EQ(o.kind(), v1::DATA_PLANE_SHM);
    EXPECT_EQ(o.max_rows(), 8u);
    EXPECT_EQ(o.region_bytes(), 2u * 8 * kH * 4);
    v1::DataPlaneAnswer ans;
    std::shared_ptr<WorkerDataPlane> worker = answer_data_plane_offer(o, kH, &ans);
    ASSERT_TRUE(worker) << ans.reason();
    EXPECT_TRUE(ans.accepted());
    EXPECT_EQ(ans.worker_device(), -1);
    EXPECT_STREQ(worker->kind(), "shm");
    ASSERT_TRUE(link->joined(Clock::now() + std::chrono::seconds(1)).ok());
    // The name is gone once both ends have it mapped: nothing is left in /dev/shm if either dies.
    EXPECT_LT(shm_open(o.shm_name().c_str(), O_RDWR, 0), 0);

    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1, 1);
    for (int64_t n : {int64_t(1), int64_t(5), int64_t(8)}) {
        std::vector<float> x(static_cast<size_t>(n * kH));
        for (float& v : x) v = u(rng);
        ASSERT_TRUE(link->put(x.data(), n, false).ok());
        std::vector<float> scratch;
        auto got = worker->activations(n, &scratch);
        ASSERT_TRUE(got.ok()) << got.status().message();
        EXPECT_EQ(std::vector<float>(got.value(), got.value() + n * kH), x) << n;
        // The worker writes straight into the region's partial half.
        float* y = worker->partial_buffer(n, &scratch);
        for (int64_t i = 0; i < n * kH; ++i) y[i] = 2 * x[i] + 1;
        ASSERT_TRUE(worker->publish(n, y).ok());
        std::vector<float> out(static_cast<size_t>(n * kH), -9);
        ASSERT_TRUE(link->get(out.data(), n, false, Clock::now()).ok());
        for (int64_t i = 0; i < n * kH; ++i) ASSERT_EQ(out[i], 2 * x[i] + 1) << i;
        // The activations were not overwritten by the partial sums (separate halves).
        EXPECT_EQ(std::vector<float>(got.value(), got.value() + n * kH), x);
    }
    // A publish from a scratch buffer (not the region) is copied in.
    std::vector<float> ext(kH, 3.5f);
    ASSERT_TRUE(worker->publish(1, ext.data()).ok());
    std::vector<float> out(kH);
    ASSERT_TRUE(link->get(out.data(), 1, false, Clock::now()).ok());
    EXPECT_EQ(out, ext);
}

TEST(ShmPlane, RowsBeyondTheBuffersAreRefused) {
    auto link = make_shm(4);
    ASSERT_TRUE(link);
    v1::DataPlaneAnswer ans;
    auto worker = answer_data_plane_offer(link->offer(), kH, &ans);
    ASSERT_TRUE(worker) << ans.reason();
    std::vector<float> x(5 * kH), scratch;
    EXPECT_EQ(link->put(x.data(), 5, false).message(), "data plane shm: a call of 5 rows, the plane holds 4");
    EXPECT_EQ(link->put(x.data(), 1, true).message(), "data plane shm: device pointers are not supported");
    EXPECT_EQ(worker->activations(5, &scratch).status().message(),
              "out-of-band call of 5 rows, the data plane holds 4");
    EXPECT_EQ(worker->publish(-1, x.data()).message(), "out-of-band call of -1 rows, the data plane holds 4");
}

TEST(ShmPlane, CoordinatorSideLimits) {
    EXPECT_EQ(LinkDataPlane::create(Transport::kShm, 0, kH, -1, -1, "t").status().message(),
              "data plane: max_rows 0 outside 1-65536");
    EXPECT_EQ(LinkDataPlane::create(Transport::kTcp, 4, kH, -1, -1, "t").status().message(),
              "transport tcp has no out-of-band data plane");
    EXPECT_EQ(LinkDataPlane::unavailable(Transport::kShm), "");
#ifndef MOEMESH_HAVE_CUDA
    EXPECT_EQ(LinkDataPlane::create(Transport::kCudaIpc, 4, kH, 0, 0, "t").status().message(),
              "transport cuda-ipc needs the CUDA build (-DMOEMESH_CUDA=ON)");
    EXPECT_EQ(LinkDataPlane::unavailable(Transport::kNccl),
              "transport nccl needs a CUDA build that found libnccl (-DMOEMESH_CUDA=ON, NCCL installed)");
#endif
}

// Every bad negotiation is refused by the worker with a reason naming the plane and the field.
TEST(DataPlaneOffer, BadAndOversizedOffersAreRefused) {
    auto link = make_shm(4);
    ASSERT_TRUE(link);
    const v1::DataPlaneOffer good = link->offer();
    auto refused = [&](const v1::DataPlaneOffer& o, int64_t hidden = kH) {
        v1::DataPlaneAnswer a;
        auto p = answer_data_plane_offer(o, hidden, &a);
        EXPECT_FALSE(a.accepted());
        EXPECT_EQ(p, nullptr);
        return a.reason();
    };
    EXPECT_EQ(refused(good, 64), "data plane shm: hidden 48 != the model's 64");
    v1::DataPlaneOffer o = good;
    o.set_kind(static_cast<v1::DataPlaneKind>(7));
    EXPECT_EQ(refused(o), "data plane: unknown kind 7 (this worker knows shm = 1, cuda-ipc = 2, nccl = 3)");
    o = good;
    o.set_max_rows(0);
    EXPECT_EQ(refused(o), "data plane shm: max_rows 0 is outside 1-65536");
    o = good;
    o.set_max_rows(65537);
    EXPECT_EQ(refused(o), "data plane shm: max_rows 65537 is outside 1-65536");
    // 65536 rows x hidden 16384 x 2 x 4 bytes = 8 GiB: over the worker's 4 GiB limit.
    o = good;
    o.set_max_rows(65536);
    o.set_hidden(16384);
    EXPECT_EQ(refused(o, 16384),
              "data plane shm: max_rows 65536 × hidden 16384 needs a 8589934592-byte region, more than this worker's "
              "limit of 4294967296 bytes (lower coordinator.data_plane_rows)");
    o = good;
    o.set_region_bytes(good.region_bytes() * 2);
    EXPECT_EQ(refused(o), "data plane shm: region_bytes 3072 != 2 × max_rows 4 × hidden 48 × 4 = 1536");
    o = good;
    o.set_shm_name("/dev/shm/../../etc/passwd");
    EXPECT_EQ(refused(o), "data plane shm: bad shared-memory name \"/dev/shm/../../etc/passwd\" (expected /name)");
    o = good;
    o.set_shm_name("");
    EXPECT_EQ(refused(o), "data plane shm: bad shared-memory name \"\" (expected /name)");
    o = good;
    o.set_shm_name("/moemesh-test-no-such-object");
    EXPECT_EQ(refused(o),
              "data plane shm: cannot open shared memory /moemesh-test-no-such-object: No such file or directory (is the "
              "coordinator on this host, and /dev/shm shared between the two?)");
    // A region smaller than the offer says (another object, or a truncated one): refused before mapping.
    o = good;
    o.set_max_rows(2);
    o.set_region_bytes(2u * 2 * kH * 4);
    EXPECT_EQ(refused(o), "data plane shm: " + good.shm_name() + " is 1536 bytes, the offer says 768");
    o = good;
    o.set_kind(v1::DATA_PLANE_CUDA_IPC);
    o.set_cuda_ipc_handle("short");
    EXPECT_EQ(refused(o), "data plane cuda-ipc: the IPC handle is 5 bytes, expected 64");
    o = good;
    o.set_kind(v1::DATA_PLANE_NCCL);
    EXPECT_EQ(refused(o), "data plane nccl: the unique id is 0 bytes, expected 128");
    o.set_nccl_unique_id(std::string(128, '\0'));
    o.set_worker_device(-1);
    EXPECT_EQ(refused(o), "data plane nccl: worker_device -1 is not a CUDA device index");
#ifndef MOEMESH_HAVE_CUDA
    o.set_worker_device(0);
    EXPECT_EQ(refused(o), "data plane nccl: this worker was built without NCCL (CUDA build with libnccl found)");
    o = good;
    o.set_kind(v1::DATA_PLANE_CUDA_IPC);
    o.set_cuda_ipc_handle(std::string(64, '\0'));
    o.set_worker_device(0);
    EXPECT_EQ(refused(o), "data plane cuda-ipc: this worker was built without CUDA (-DMOEMESH_CUDA=ON)");
#endif
    // The good offer still works after all that.
    v1::DataPlaneAnswer a;
    EXPECT_TRUE(answer_data_plane_offer(good, kH, &a)) << a.reason();
}

}  // namespace
}  // namespace moemesh
