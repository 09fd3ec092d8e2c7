/*
 * What Node's fs and net modules lack and blockgate needs: fallocate() with
 * PUNCH_HOLE / ZERO_RANGE (TRIM and WRITE_ZEROES that free or zero space
 * without writing it), lseek() with SEEK_DATA / SEEK_HOLE (honest block
 * status on sparse files), readahead hints for NBD_CMD_CACHE, the size of a block device, and the credentials
 * of the peer on a Unix socket (who is talking to the admin socket).
 *
 * Errors are thrown as Error objects carrying `code` (e.g. "EOPNOTSUPP") and
 * `errno`, the same shape Node's own fs errors have, so the TypeScript side
 * maps them to block errors in one place.
 */
#include <node_api.h>

#include "lz4_block.h"
#include "xxh3_128.h"

#include <errno.h>
#include <fcntl.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define CHECK(call)                                                            \
  do {                                                                         \
    if ((call) != napi_ok) {                                                   \
      napi_throw_error(env, NULL, "N-API call failed: " #call);                \
      return NULL;                                                             \
    }                                                                          \
  } while (0)

/*
 * The jobs of the libuv pool (preads, pwrites, codec batches) are throughput work; the
 * event loop's thread is the gateway's one serial path. Under the default policy a pool
 * thread woken while no CPU is free preempts the thread that woke it, and the event loop
 * then sits out the job it has just handed off: wall-clock profiles of 1 MiB reads on a
 * 2-CPU guest put a third of the loop's time inside the calls that queue jobs. SCHED_BATCH
 * keeps a thread's share of the CPU (same nice level) and gives up only wake-up
 * preemption. It takes no privilege; where it is refused (another OS, a sandbox) nothing
 * changes.
 */
static int throughput_policy(void) {
#ifdef SCHED_BATCH
  struct sched_param param = {0};
  return sched_setscheduler(0, SCHED_BATCH, &param) == 0;
#else
  return 0;
#endif
}

/* Called at the start of every pool job: the first one on each thread sets its policy. */
static void pool_thread_policy(void) {
  static __thread int done;
  if (done) return;
  done = 1;
  (void)throughput_policy();
}

static const char *errno_code(int err) {
  switch (err) {
  case EOPNOTSUPP: return "EOPNOTSUPP";
  case EBADF: return "EBADF";
  case EINVAL: return "EINVAL";
  case ENOSPC: return "ENOSPC";
  case EIO: return "EIO";
  case ENXIO: return "ENXIO";
  case EPERM: return "EPERM";
  case EFBIG: return "EFBIG";
  case ENOTTY: return "ENOTTY";
  case ENODEV: return "ENODEV";
  case ENOTSOCK: return "ENOTSOCK";
  case EINTR: return "EINTR";
  case EAGAIN: return "EAGAIN";
  case EFAULT: return "EFAULT";
  case EDQUOT: return "EDQUOT";
  case EROFS: return "EROFS";
  case EISDIR: return "EISDIR";
  case ENOENT: return "ENOENT";
  case EACCES: return "EACCES";
  case ENOEXEC: return "ENOEXEC";
  case E2BIG: return "E2BIG";
  default: return "EUNKNOWN";
  }
}

static napi_value make_errno_error(napi_env env, int err, const char *syscall) {
  char msg[256];
  napi_value code, message, error, num;
  snprintf(msg, sizeof msg, "%s: %s", syscall, strerror(err));
  napi_create_string_utf8(env, errno_code(err), NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message);
  napi_create_error(env, code, message, &error);
  napi_create_int32(env, -err, &num);
  napi_set_named_property(env, error, "errno", num);
  napi_set_named_property(env, error, "code", code);
  return error;
}

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "wrong number of arguments");
    return 0;
  }
  return 1;
}

static int get_i64(napi_env env, napi_value v, int64_t *out, const char *what) {
  if (napi_get_value_int64(env, v, out) != napi_ok || *out < 0) {
    char msg[96];
    snprintf(msg, sizeof msg, "%s must be a non-negative integer", what);
    napi_throw_type_error(env, NULL, msg);
    return 0;
  }
  return 1;
}

/* fallocate runs on the libuv pool: punching a large hole can take long. */
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int fd;
  int mode;
  int64_t offset;
  int64_t length;
  int err;
} falloc_job;

static void falloc_execute(napi_env env, void *data) {
  (void)env;
  pool_thread_policy();
  falloc_job *job = data;
  int r;
  do {
    r = fallocate(job->fd, job->mode, job->offset, job->length);
  } while (r < 0 && errno == EINTR);
  job->err = r < 0 ? errno : 0;
}

static void falloc_complete(napi_env env, napi_status status, void *data) {
  falloc_job *job = data;
  napi_value result;
  if (status != napi_ok) {
    job->err = EIO;
  }
  if (job->err) {
    napi_reject_deferred(env, job->deferred, make_errno_error(env, job->err, "fallocate"));
  } else {
    napi_get_undefined(env, &result);
    napi_resolve_deferred(env, job->deferred, result);
  }
  napi_delete_async_work(env, job->work);
  free(job);
}

/* fallocate(fd, mode, offset, length) -> Promise<void> */
static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  napi_value argv[4], promise, name;
  int64_t fd, mode, offset, length;
  if (!get_args(env, info, 4, argv)) return NULL;
  if (!get_i64(env, argv[0], &fd, "fd") || !get_i64(env, argv[1], &mode, "mode") ||
      !get_i64(env, argv[2], &offset, "offset") || !get_i64(env, argv[3], &length, "length"))
    return NULL;
  falloc_job *job = calloc(1, sizeof *job);
  if (!job) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  job->fd = (int)fd;
  job->mode = (int)mode;
  job->offset = offset;
  job->length = length;
  CHECK(napi_create_promise(env, &job->deferred, &promise));
  CHECK(napi_create_string_utf8(env, "blockgate:fallocate", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_async_work(env, NULL, name, falloc_execute, falloc_complete, job, &job->work));
  CHECK(napi_queue_async_work(env, job->work));
  return promise;
}

/* seek(fd, offset, whence) -> number; -1 when there is no further data (ENXIO). */
static napi_value js_seek(napi_env env, napi_callback_info info) {
  napi_value argv[3], result;
  int64_t fd, offset, whence;
  if (!get_args(env, info, 3, argv)) return NULL;
  if (!get_i64(env, argv[0], &fd, "fd") || !get_i64(env, argv[1], &offset, "offset") ||
      !get_i64(env, argv[2], &whence, "whence"))
    return NULL;
  off_t r = lseek((int)fd, (off_t)offset, (int)whence);
  if (r < 0) {
    if (errno == ENXIO) {
      CHECK(napi_create_int64(env, -1, &result));
      return result;
    }
    napi_throw(env, make_errno_error(env, errno, "lseek"));
    return NULL;
  }
  CHECK(napi_create_int64(env, (int64_t)r, &result));
  return result;
}

/*
 * readNoWait / writeNoWait(fd, buffer, offset) -> bytes transferred, or -1
 * when the kernel would have to block (data not in the page cache, dirty
 * throttling). preadv2/pwritev2 with RWF_NOWAIT let the event loop serve
 * cached I/O in a couple of microseconds and send only the rest to the
 * thread pool, whose round trip costs far more than a cached 4 KiB copy.
 */
static napi_value nowait_io(napi_env env, napi_callback_info info, int write) {
  napi_value argv[3], result;
  int64_t fd, offset;
  void *data;
  size_t length;
  if (!get_args(env, info, 3, argv)) return NULL;
  if (!get_i64(env, argv[0], &fd, "fd") || !get_i64(env, argv[2], &offset, "offset")) return NULL;
  if (napi_get_buffer_info(env, argv[1], &data, &length) != napi_ok) {
    napi_throw_type_error(env, NULL, "buffer must be a Buffer");
    return NULL;
  }
  struct iovec iov = {data, length};
  ssize_t n;
  do {
    n = write ? pwritev2((int)fd, &iov, 1, (off_t)offset, RWF_NOWAIT)
              : preadv2((int)fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EOPNOTSUPP) {
      CHECK(napi_create_int64(env, -1, &result));
      return result;
    }
    napi_throw(env, make_errno_error(env, errno, write ? "pwritev2" : "preadv2"));
    return NULL;
  }
  CHECK(napi_create_int64(env, (int64_t)n, &result));
  return result;
}

static napi_value js_read_no_wait(napi_env env, napi_callback_info info) { return nowait_io(env, info, 0); }
static napi_value js_write_no_wait(napi_env env, napi_callback_info info) { return nowait_io(env, info, 1); }

/*
 * ioBatch(fd, write, buffers, offsets) -> Promise<Int32Array of errno per item, 0 = done>.
 * One thread-pool job for every request of a tick: the event loop pays one
 * round trip per batch instead of one per 4 KiB block. Items are transferred
 * in full (short transfers are retried); a read past end of file fills zeroes.
 */
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref buffers_ref;
  int fd;
  int write;
  uint32_t count;
  void **data;
  size_t *length;
  int64_t *offset;
  int32_t *err;
} io_batch;

static void io_batch_free(io_batch *b) {
  free(b->data);
  free(b->length);
  free(b->offset);
  free(b->err);
  free(b);
}

static void io_batch_execute(napi_env env, void *arg) {
  (void)env;
  pool_thread_policy();
  io_batch *b = arg;
  for (uint32_t i = 0; i < b->count; i++) {
    size_t done = 0;
    b->err[i] = 0;
    while (done < b->length[i]) {
      char *p = (char *)b->data[i] + done;
      size_t left = b->length[i] - done;
      off_t at = (off_t)(b->offset[i] + (int64_t)done);
      ssize_t n = b->write ? pwrite(b->fd, p, left, at) : pread(b->fd, p, left, at);
      if (n < 0) {
        if (errno == EINTR) continue;
        b->err[i] = errno;
        break;
      }
      if (n == 0) {
        if (b->write) {
          b->err[i] = EIO;
        } else {
          memset(p, 0, left);
        }
        break;
      }
      done += (size_t)n;
    }
  }
}

static void io_batch_complete(napi_env env, napi_status status, void *arg) {
  io_batch *b = arg;
  napi_value ab, result;
  void *out;
  if (status != napi_ok) {
    for (uint32_t i = 0; i < b->count; i++) b->err[i] = EIO;
  }
  if (napi_create_arraybuffer(env, b->count * sizeof(int32_t), &out, &ab) == napi_ok &&
      napi_create_typedarray(env, napi_int32_array, b->count, ab, 0, &result) == napi_ok) {
    memcpy(out, b->err, b->count * sizeof(int32_t));
    napi_resolve_deferred(env, b->deferred, result);
  } else {
    napi_reject_deferred(env, b->deferred, make_errno_error(env, ENOMEM, "ioBatch"));
  }
  napi_delete_reference(env, b->buffers_ref);
  napi_delete_async_work(env, b->work);
  io_batch_free(b);
}

static napi_value js_io_batch(napi_env env, napi_callback_info info) {
  napi_value argv[4], promise, name, item;
  int64_t fd, offset;
  bool write;
  uint32_t count, offsets_count;
  if (!get_args(env, info, 4, argv)) return NULL;
  if (!get_i64(env, argv[0], &fd, "fd")) return NULL;
  if (napi_get_value_bool(env, argv[1], &write) != napi_ok ||
      napi_get_array_length(env, argv[2], &count) != napi_ok ||
      napi_get_array_length(env, argv[3], &offsets_count) != napi_ok || count != offsets_count || count == 0) {
    napi_throw_type_error(env, NULL, "ioBatch(fd, write, buffers[], offsets[]) with equal non-empty arrays");
    return NULL;
  }
  io_batch *b = calloc(1, sizeof *b);
  if (b) {
    b->data = calloc(count, sizeof *b->data);
    b->length = calloc(count, sizeof *b->length);
    b->offset = calloc(count, sizeof *b->offset);
    b->err = calloc(count, sizeof *b->err);
  }
  if (!b || !b->data || !b->length || !b->offset || !b->err) {
    if (b) io_batch_free(b);
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  b->fd = (int)fd;
  b->write = write;
  b->count = count;
  for (uint32_t i = 0; i < count; i++) {
    if (napi_get_element(env, argv[2], i, &item) != napi_ok ||
        napi_get_buffer_info(env, item, &b->data[i], &b->length[i]) != napi_ok ||
        napi_get_element(env, argv[3], i, &item) != napi_ok || !get_i64(env, item, &offset, "offset")) {
      io_batch_free(b);
      napi_throw_type_error(env, NULL, "ioBatch: buffers must be Buffers and offsets non-negative integers");
      return NULL;
    }
    b->offset[i] = offset;
  }
  /* The array keeps every buffer alive until the pool thread is done with it. */
  if (napi_create_reference(env, argv[2], 1, &b->buffers_ref) != napi_ok ||
      napi_create_promise(env, &b->deferred, &promise) != napi_ok) {
    io_batch_free(b);
    napi_throw_error(env, NULL, "ioBatch: N-API failure");
    return NULL;
  }
  CHECK(napi_create_string_utf8(env, "blockgate:ioBatch", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_async_work(env, NULL, name, io_batch_execute, io_batch_complete, b, &b->work));
  CHECK(napi_queue_async_work(env, b->work));
  return promise;
}

/*
 * lz4Compress(src, dst) -> compressed length, or -1 when it would not fit in dst
 * (the caller then stores the block raw). lz4Decompress(src, dst) -> length
 * written, or -1 for a malformed payload. Both work in caller-owned buffers.
 */
static napi_value lz4_call(napi_env env, napi_callback_info info, int compress) {
  napi_value argv[2], result;
  void *src, *dst;
  size_t src_len, dst_len;
  if (!get_args(env, info, 2, argv)) return NULL;
  if (napi_get_buffer_info(env, argv[0], &src, &src_len) != napi_ok ||
      napi_get_buffer_info(env, argv[1], &dst, &dst_len) != napi_ok) {
    napi_throw_type_error(env, NULL, "lz4: arguments must be Buffers");
    return NULL;
  }
  long n = compress ? lz4_block_compress(src, src_len, dst, dst_len) : lz4_block_decompress(src, src_len, dst, dst_len);
  CHECK(napi_create_int64(env, n, &result));
  return result;
}

static napi_value js_lz4_compress(napi_env env, napi_callback_info info) { return lz4_call(env, info, 1); }
static napi_value js_lz4_decompress(napi_env env, napi_callback_info info) { return lz4_call(env, info, 0); }

/*
 * Keyed XXH3-128 (see xxh3_128.c) for the dedup store. Both functions write
 * into caller-owned memory: allocating a Buffer per digest, as xxhash-addon
 * does, costs several times more than hashing a 4 KiB block.
 *
 * Byte arguments may be any TypedArray or DataView, over an ArrayBuffer or a
 * SharedArrayBuffer (worker pools hash shared slabs), and are taken as the
 * bytes they view.
 */
static int get_bytes(napi_env env, napi_value v, uint8_t **data, size_t *len, const char *what) {
  bool is_typed = false, is_view = false;
  void *p = NULL;
  char msg[96];
  if (napi_is_typedarray(env, v, &is_typed) == napi_ok && is_typed) {
    napi_typedarray_type type;
    size_t count, width;
    /* Node hands back the data pointer already advanced by the view's byte offset. */
    if (napi_get_typedarray_info(env, v, &type, &count, &p, NULL, NULL) != napi_ok) goto bad;
    switch (type) {
    case napi_int8_array:
    case napi_uint8_array:
    case napi_uint8_clamped_array: width = 1; break;
    case napi_int16_array:
    case napi_uint16_array: width = 2; break;
    case napi_int32_array:
    case napi_uint32_array:
    case napi_float32_array: width = 4; break;
    case napi_float64_array:
    case napi_bigint64_array:
    case napi_biguint64_array: width = 8; break;
    default: goto bad;
    }
    *data = p;
    *len = count * width;
    return 1;
  }
  if (napi_is_dataview(env, v, &is_view) == napi_ok && is_view) {
    if (napi_get_dataview_info(env, v, len, &p, NULL, NULL) != napi_ok) goto bad;
    *data = p;
    return 1;
  }
bad:
  snprintf(msg, sizeof msg, "%s must be a Buffer, TypedArray or DataView", what);
  napi_throw_type_error(env, NULL, msg);
  return 0;
}

/* A whole number in [min, max]: TypeError if not a number, RangeError otherwise. */
static int get_index(napi_env env, napi_value v, double min, double max, size_t *out, const char *what) {
  double d;
  char msg[128];
  if (napi_get_value_double(env, v, &d) != napi_ok) {
    snprintf(msg, sizeof msg, "%s must be a number", what);
    napi_throw_type_error(env, NULL, msg);
    return 0;
  }
  /* The comparisons are false for NaN, so NaN lands in the error branch too. */
  if (!(d >= min && d <= max && d == (double)(uint64_t)d)) {
    snprintf(msg, sizeof msg, "%s must be an integer in [%.0f, %.0f], got %g", what, min, max, d);
    napi_throw_range_error(env, NULL, msg);
    return 0;
  }
  *out = (size_t)d;
  return 1;
}

/* A TypedArray of the given element type: its data and element count. No exception is thrown. */
static int get_typed(napi_env env, napi_value v, napi_typedarray_type want, void **data, size_t *n) {
  bool typed;
  napi_typedarray_type type;
  return napi_is_typedarray(env, v, &typed) == napi_ok && typed &&
         napi_get_typedarray_info(env, v, &type, n, data, NULL, NULL) == napi_ok && type == want;
}

static int get_secret(napi_env env, napi_value v, uint8_t **secret, size_t *len) {
  if (!get_bytes(env, v, secret, len, "secret")) return 0;
  if (*len < XXH3_128_SECRET_MIN) {
    char msg[96];
    snprintf(msg, sizeof msg, "secret must be at least %d bytes, got %zu", XXH3_128_SECRET_MIN, *len);
    napi_throw_range_error(env, NULL, msg);
    return 0;
  }
  return 1;
}

/* hash128Into(secret, data, out, outOffset): canonical XXH3-128 of data at out[outOffset, +16). */
static napi_value js_hash128_into(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  uint8_t *secret, *data, *out;
  size_t secret_len, data_len, out_len, at;
  if (!get_args(env, info, 4, argv)) return NULL;
  if (!get_secret(env, argv[0], &secret, &secret_len) || !get_bytes(env, argv[1], &data, &data_len, "data") ||
      !get_bytes(env, argv[2], &out, &out_len, "out"))
    return NULL;
  if (out_len < XXH3_128_CANONICAL_SIZE) {
    napi_throw_range_error(env, NULL, "out must have room for a 16-byte hash");
    return NULL;
  }
  if (!get_index(env, argv[3], 0, (double)(out_len - XXH3_128_CANONICAL_SIZE), &at, "outOffset")) return NULL;
  /* The hash is complete before anything is written, so out may overlap the inputs. */
  xxh3_128_canonical(xxh3_128_with_secret(data, data_len, secret, secret_len), out + at);
  return NULL;
}

/*
 * decodeRecord(secret, rec, recOffset, out, outOffset, blockId, expected, expectedOffset)
 *   -> 0, or a DECODE_* code saying what is wrong with the record.
 * A segment record (40-byte header, then an lz4 or raw payload) at rec[recOffset..]
 * decoded into the 4 KiB at out[outOffset..] and hash-checked against the 16 bytes
 * at expected[expectedOffset..], in one call: a 1 MiB read decodes 256 records, and
 * the subarrays and separate calls for header, lz4, hash and compare cost as much
 * as the decoding. The header layout is gateway/store/layout.ts's.
 */
/*
 * Starts a pool job whose arguments `refs` hold: its promise, then its async work. If
 * N-API fails on the way, nothing is left behind (the promise settled and dropped, the
 * references deleted, `job` freed) and an error is thrown.
 */
static napi_value start_job(napi_env env, const char *name, napi_async_execute_callback execute,
                            napi_async_complete_callback complete, void *job, napi_ref *refs, int nrefs,
                            napi_deferred *deferred, napi_async_work *work) {
  napi_value promise, id, undefined;
  if (napi_create_promise(env, deferred, &promise) == napi_ok) {
    if (napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &id) == napi_ok &&
        napi_create_async_work(env, NULL, id, execute, complete, job, work) == napi_ok) {
      if (napi_queue_async_work(env, *work) == napi_ok) return promise;
      napi_delete_async_work(env, *work);
    }
    /* Resolved, not rejected: nobody holds it, and a rejection would go unhandled. */
    napi_get_undefined(env, &undefined);
    napi_resolve_deferred(env, *deferred, undefined);
  }
  for (int i = 0; i < nrefs; i++) napi_delete_reference(env, refs[i]);
  free(job);
  napi_throw_error(env, NULL, "N-API failure starting a pool job");
  return NULL;
}

/*
 * A job start_job started is done: its references and work go, and its promise settles:
 * rejected with ECANCELED if the pool never ran it, with `err` (errno of `err_call`) if
 * the job failed, resolved otherwise. `job` is freed.
 */
static void finish_job(napi_env env, napi_status status, napi_ref *refs, int nrefs, napi_async_work work,
                       napi_deferred deferred, const char *name, int err, const char *err_call, void *job) {
  napi_value undefined;
  for (int i = 0; i < nrefs; i++) napi_delete_reference(env, refs[i]);
  napi_delete_async_work(env, work);
  napi_get_undefined(env, &undefined);
  if (status != napi_ok) napi_reject_deferred(env, deferred, make_errno_error(env, ECANCELED, name));
  else if (err) napi_reject_deferred(env, deferred, make_errno_error(env, err, err_call));
  else napi_resolve_deferred(env, deferred, undefined);
  free(job);
}

enum { DECODE_OK, DECODE_NO_HEADER, DECODE_WRONG_BLOCK, DECODE_BAD_PAYLOAD, DECODE_BAD_HASH };
#define RECORD_MAGIC 0x42475231u
#define RECORD_HEADER 40
#define STORE_BLOCK 4096

static uint32_t be32(const uint8_t *p) {
  return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

/* One record at h (room bytes to the end of its buffer) into dst's 4 KiB, checked against expected's 16 bytes. */
static int decode_one(const uint8_t *secret, size_t secret_len, const uint8_t *h, size_t room, uint8_t *dst,
                      uint64_t block_id, const uint8_t *expected) {
  uint8_t digest[16];
  if (room < RECORD_HEADER || be32(h) != RECORD_MAGIC) return DECODE_NO_HEADER;
  if (((uint64_t)be32(h + 8) << 32 | be32(h + 12)) != block_id) return DECODE_WRONG_BLOCK;
  size_t stored = be32(h + 16);
  int lz4 = ((h[4] << 8) | h[5]) & 1;
  if (stored > room - RECORD_HEADER) return DECODE_BAD_PAYLOAD;
  if (lz4) {
    if (lz4_block_decompress(h + RECORD_HEADER, stored, dst, STORE_BLOCK) != STORE_BLOCK) return DECODE_BAD_PAYLOAD;
  } else if (stored == STORE_BLOCK) {
    memmove(dst, h + RECORD_HEADER, STORE_BLOCK);
  } else {
    return DECODE_BAD_PAYLOAD;
  }
  xxh3_128_canonical(xxh3_128_with_secret(dst, STORE_BLOCK, secret, secret_len), digest);
  return memcmp(digest, expected, 16) == 0 ? DECODE_OK : DECODE_BAD_HASH;
}

static napi_value js_decode_record(napi_env env, napi_callback_info info) {
  napi_value argv[8], result;
  uint8_t *secret, *rec, *out, *expected;
  size_t secret_len, rec_len, out_len, exp_len, rec_at, out_at, exp_at, block_id;
  int status;
  if (!get_args(env, info, 8, argv)) return NULL;
  if (!get_secret(env, argv[0], &secret, &secret_len) || !get_bytes(env, argv[1], &rec, &rec_len, "rec") ||
      !get_bytes(env, argv[3], &out, &out_len, "out") || !get_bytes(env, argv[6], &expected, &exp_len, "expected"))
    return NULL;
  if (out_len < STORE_BLOCK || exp_len < 16) {
    napi_throw_range_error(env, NULL, "out must hold a block and expected a 16-byte hash");
    return NULL;
  }
  if (!get_index(env, argv[2], 0, (double)rec_len, &rec_at, "recOffset") ||
      !get_index(env, argv[4], 0, (double)(out_len - STORE_BLOCK), &out_at, "outOffset") ||
      !get_index(env, argv[5], 0, 9007199254740991.0, &block_id, "blockId") ||
      !get_index(env, argv[7], 0, (double)(exp_len - 16), &exp_at, "expectedOffset"))
    return NULL;
  status = decode_one(secret, secret_len, rec + rec_at, rec_len - rec_at, out + out_at, (uint64_t)block_id,
                      expected + exp_at);
  CHECK(napi_create_int32(env, status, &result));
  return result;
}

/*
 * decodeRecords(secret, rec, items, hashes, out, status) -> Promise<void>: decodeRecord
 * for many records of one buffer, on the libuv pool. items holds four numbers per
 * record: its offset in rec, its block id, where its 4 KiB go in out, and where its
 * expected hash is in hashes (-1: the hash in its own header, a place the store
 * remembered). status[k] gets record k's DECODE_* code. A 1 MiB read decodes 256
 * blocks, a quarter of a millisecond that the event loop spends serving other
 * requests instead, and that runs beside it on the machine's other cores.
 * Every argument is checked before the job starts; none may change until it settles.
 *
 * With a file descriptor and offset as two more arguments, the job first preads all of
 * rec from the file: the event loop then neither copies the run out of the page cache
 * nor waits for a disk. A failed read rejects with the errno and decodes nothing; bytes
 * past the end of the file read as zeroes (their records fail as missing headers, each
 * on its own, as a damaged record does).
 */
#define DECODE_ARGS 6
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref refs[DECODE_ARGS];
  uint8_t *secret, *rec, *hashes, *out;
  size_t secret_len, rec_len, hashes_len, out_len, count;
  double *items;
  int32_t *status;
  int fd; /* -1: rec already holds the records */
  int64_t file_offset;
  int read_error;
} decode_job;

static void decode_execute(napi_env env, void *arg) {
  (void)env;
  pool_thread_policy();
  decode_job *j = arg;
  for (size_t done = 0; j->fd >= 0 && done < j->rec_len;) {
    ssize_t n = pread(j->fd, j->rec + done, j->rec_len - done, (off_t)(j->file_offset + (int64_t)done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      j->read_error = errno;
      return;
    }
    if (n == 0) {
      /* A file cut short: its missing records fail their checks one by one below. */
      memset(j->rec + done, 0, j->rec_len - done);
      break;
    }
    done += (size_t)n;
  }
  for (size_t k = 0; k < j->count; k++) {
    const double *it = j->items + 4 * k;
    size_t rec_at = (size_t)it[0], out_at = (size_t)it[2];
    const uint8_t *expected = it[3] < 0 ? j->rec + rec_at + 24 : j->hashes + (size_t)it[3];
    j->status[k] = decode_one(j->secret, j->secret_len, j->rec + rec_at, j->rec_len - rec_at, j->out + out_at,
                              (uint64_t)it[1], expected);
  }
}

static void decode_complete(napi_env env, napi_status status, void *arg) {
  decode_job *j = arg;
  finish_job(env, status, j->refs, DECODE_ARGS, j->work, j->deferred, "decodeRecords", j->read_error, "pread", j);
}

static napi_value js_decode_records(napi_env env, napi_callback_info info) {
  napi_value argv[DECODE_ARGS + 2];
  uint8_t *items_bytes, *status_bytes;
  size_t items_len, status_len, argc = DECODE_ARGS + 2;
  size_t n;
  int64_t fd = -1, file_offset = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  if (argc != DECODE_ARGS && argc != DECODE_ARGS + 2) {
    napi_throw_type_error(env, NULL, "decodeRecords: 6 arguments, or 8 with a file descriptor and offset");
    return NULL;
  }
  if (argc == DECODE_ARGS + 2 &&
      (!get_i64(env, argv[DECODE_ARGS], &fd, "fd") || !get_i64(env, argv[DECODE_ARGS + 1], &file_offset, "offset")))
    return NULL;
  if (fd > INT32_MAX) {
    napi_throw_range_error(env, NULL, "decodeRecords: fd out of range");
    return NULL;
  }
  decode_job *j = calloc(1, sizeof *j);
  if (!j) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  j->fd = (int)fd;
  j->file_offset = file_offset;
  if (!get_secret(env, argv[0], &j->secret, &j->secret_len) || !get_bytes(env, argv[1], &j->rec, &j->rec_len, "rec") ||
      !get_bytes(env, argv[3], &j->hashes, &j->hashes_len, "hashes") ||
      !get_bytes(env, argv[4], &j->out, &j->out_len, "out"))
    goto fail;
  if (!get_typed(env, argv[2], napi_float64_array, (void **)&items_bytes, &n) || n % 4 != 0 ||
      !get_typed(env, argv[5], napi_int32_array, (void **)&status_bytes, &status_len) || status_len != n / 4) {
    napi_throw_type_error(env, NULL, "decodeRecords: items a Float64Array of 4 per record, status an Int32Array of 1");
    goto fail;
  }
  items_len = n;
  j->items = (double *)items_bytes;
  j->status = (int32_t *)status_bytes;
  j->count = items_len / 4;
  /* The pool thread trusts these: every offset is checked here, on the JS thread. */
  for (size_t k = 0; k < j->count; k++) {
    const double *it = j->items + 4 * k;
    int ok = it[0] >= 0 && it[0] == (double)(size_t)it[0] && (size_t)it[0] < j->rec_len && it[1] >= 0 &&
             it[1] <= 9007199254740991.0 && it[2] >= 0 && it[2] == (double)(size_t)it[2] &&
             j->out_len >= STORE_BLOCK && (size_t)it[2] <= j->out_len - STORE_BLOCK &&
             (it[3] < 0 ? it[3] == -1 && j->rec_len - (size_t)it[0] >= RECORD_HEADER
                        : it[3] == (double)(size_t)it[3] && j->hashes_len >= 16 && (size_t)it[3] <= j->hashes_len - 16);
    if (!ok) {
      char msg[96];
      snprintf(msg, sizeof msg, "decodeRecords: item %zu is out of range", k);
      napi_throw_range_error(env, NULL, msg);
      goto fail;
    }
  }
  for (int i = 0; i < DECODE_ARGS; i++) {
    if (napi_create_reference(env, argv[i], 1, &j->refs[i]) != napi_ok) {
      for (int r = 0; r < i; r++) napi_delete_reference(env, j->refs[r]);
      napi_throw_error(env, NULL, "decodeRecords: N-API failure");
      goto fail;
    }
  }
  return start_job(env, "blockgate:decodeRecords", decode_execute, decode_complete, j, j->refs, DECODE_ARGS,
                   &j->deferred, &j->work);
fail:
  free(j);
  return NULL;
}

/*
 * encodeRecords(data, items, hashes, out, lengths) -> Promise, on the libuv pool.
 * The new blocks of a large write, packed as segment records one after another
 * into out: items holds (block index in data, block id) per record, hashes the
 * 16-byte hash of every block of data, and lengths[k] gets record k's length.
 * lz4 for 256 blocks of a 1 MiB write took a third of the event loop inline;
 * a libuv job costs no copy and no message, unlike the piscina pool's slabs.
 */
#define ENCODE_ARGS 5
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref refs[ENCODE_ARGS];
  uint8_t *data, *hashes, *out;
  double *items;
  int32_t *lengths;
  size_t count;
} encode_job;

static void put_be32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24);
  p[1] = (uint8_t)(v >> 16);
  p[2] = (uint8_t)(v >> 8);
  p[3] = (uint8_t)v;
}

/* The header layout is gateway/store/layout.ts's encodeRecordHeader. */
static size_t encode_one(const uint8_t *block, const uint8_t *hash, uint64_t id, uint8_t *rec) {
  /* One byte short of a block: output that gains nothing does not fit, and the block goes raw. */
  long packed = lz4_block_compress(block, STORE_BLOCK, rec + RECORD_HEADER, STORE_BLOCK - 1);
  size_t stored = packed > 0 ? (size_t)packed : STORE_BLOCK;
  if (packed <= 0) memcpy(rec + RECORD_HEADER, block, STORE_BLOCK);
  put_be32(rec, RECORD_MAGIC);
  put_be32(rec + 4, packed > 0 ? 1u << 16 : 0); /* flags (LZ4 = 1), then 16 reserved bits */
  put_be32(rec + 8, (uint32_t)(id >> 32));
  put_be32(rec + 12, (uint32_t)id);
  put_be32(rec + 16, (uint32_t)stored);
  put_be32(rec + 20, 0);
  memcpy(rec + 24, hash, 16);
  return RECORD_HEADER + stored;
}

static void encode_execute(napi_env env, void *arg) {
  (void)env;
  pool_thread_policy();
  encode_job *j = arg;
  size_t at = 0;
  for (size_t k = 0; k < j->count; k++) {
    size_t index = (size_t)j->items[2 * k];
    size_t n = encode_one(j->data + index * STORE_BLOCK, j->hashes + 16 * index, (uint64_t)j->items[2 * k + 1],
                          j->out + at);
    j->lengths[k] = (int32_t)n;
    at += n;
  }
}

static void encode_complete(napi_env env, napi_status status, void *arg) {
  encode_job *j = arg;
  finish_job(env, status, j->refs, ENCODE_ARGS, j->work, j->deferred, "encodeRecords", 0, NULL, j);
}

static napi_value js_encode_records(napi_env env, napi_callback_info info) {
  napi_value argv[ENCODE_ARGS];
  uint8_t *data, *hashes, *out, *items_bytes, *lengths_bytes;
  size_t data_len, hashes_len, out_len, n_items, n_lengths;
  if (!get_args(env, info, ENCODE_ARGS, argv)) return NULL;
  if (!get_bytes(env, argv[0], &data, &data_len, "data") || !get_bytes(env, argv[2], &hashes, &hashes_len, "hashes") ||
      !get_bytes(env, argv[3], &out, &out_len, "out"))
    return NULL;
  if (!get_typed(env, argv[1], napi_float64_array, (void **)&items_bytes, &n_items) || n_items % 2 != 0 ||
      !get_typed(env, argv[4], napi_int32_array, (void **)&lengths_bytes, &n_lengths) || n_lengths != n_items / 2) {
    napi_throw_type_error(env, NULL, "encodeRecords: items a Float64Array of 2 per record, lengths an Int32Array of 1");
    return NULL;
  }
  size_t count = n_items / 2, blocks = data_len / STORE_BLOCK;
  const double *items = (const double *)items_bytes;
  if (data_len % STORE_BLOCK != 0 || hashes_len / 16 < blocks || out_len / (RECORD_HEADER + STORE_BLOCK) < count) {
    napi_throw_range_error(env, NULL,
                           "encodeRecords: data must be whole blocks, hashes 16 bytes per block, and out must have "
                           "room for a header and a block per record");
    return NULL;
  }
  /* The pool thread trusts these: every index is checked here, on the JS thread. */
  for (size_t k = 0; k < count; k++) {
    double index = items[2 * k], id = items[2 * k + 1];
    if (!(index >= 0 && index < (double)blocks && index == (double)(size_t)index && id >= 0 &&
          id <= 9007199254740991.0 && id == (double)(uint64_t)id)) {
      char msg[96];
      snprintf(msg, sizeof msg, "encodeRecords: item %zu is out of range", k);
      napi_throw_range_error(env, NULL, msg);
      return NULL;
    }
  }
  encode_job *j = calloc(1, sizeof *j);
  if (!j) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  j->data = data;
  j->hashes = hashes;
  j->out = out;
  j->items = (double *)items_bytes;
  j->lengths = (int32_t *)lengths_bytes;
  j->count = count;
  for (int i = 0; i < ENCODE_ARGS; i++) {
    if (napi_create_reference(env, argv[i], 1, &j->refs[i]) != napi_ok) {
      for (int r = 0; r < i; r++) napi_delete_reference(env, j->refs[r]);
      free(j);
      napi_throw_error(env, NULL, "encodeRecords: N-API failure");
      return NULL;
    }
  }
  return start_job(env, "blockgate:encodeRecords", encode_execute, encode_complete, j, j->refs, ENCODE_ARGS,
                   &j->deferred, &j->work);
}

static int overlaps(const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len) {
  uintptr_t a0 = (uintptr_t)a, b0 = (uintptr_t)b;
  return a_len && b_len && a0 < b0 + b_len && b0 < a0 + a_len;
}

/*
 * hashBlocks(secret, data, blockSize, out): hash i of data[i*blockSize, +blockSize)
 * at out[16*i, +16). Hashes are written as they are computed, so out must not
 * overlap data or secret (checked: RangeError).
 */
static napi_value js_hash_blocks(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  uint8_t *secret, *data, *out;
  size_t secret_len, data_len, out_len, block;
  if (!get_args(env, info, 4, argv)) return NULL;
  if (!get_secret(env, argv[0], &secret, &secret_len) || !get_bytes(env, argv[1], &data, &data_len, "data") ||
      !get_index(env, argv[2], 1, 9007199254740991.0, &block, "blockSize") ||
      !get_bytes(env, argv[3], &out, &out_len, "out"))
    return NULL;
  if (data_len % block != 0) {
    napi_throw_range_error(env, NULL, "data length must be a multiple of blockSize");
    return NULL;
  }
  size_t count = data_len / block;
  if (out_len / XXH3_128_CANONICAL_SIZE < count) {
    napi_throw_range_error(env, NULL, "out must have room for 16 bytes per block");
    return NULL;
  }
  size_t written = count * XXH3_128_CANONICAL_SIZE;
  if (overlaps(out, written, data, data_len) || overlaps(out, written, secret, secret_len)) {
    napi_throw_range_error(env, NULL, "out must not overlap data or secret");
    return NULL;
  }
  for (size_t i = 0; i < count; i++) {
    xxh3_128_canonical(xxh3_128_with_secret(data + i * block, block, secret, secret_len),
                       out + i * XXH3_128_CANONICAL_SIZE);
  }
  return NULL;
}

/* willNeed(fd, offset, length): start readahead of a range (posix_fadvise WILLNEED). */
static napi_value js_will_need(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t fd, offset, length;
  if (!get_args(env, info, 3, argv)) return NULL;
  if (!get_i64(env, argv[0], &fd, "fd") || !get_i64(env, argv[1], &offset, "offset") ||
      !get_i64(env, argv[2], &length, "length"))
    return NULL;
  int err = posix_fadvise((int)fd, (off_t)offset, (off_t)length, POSIX_FADV_WILLNEED);
  if (err) {
    napi_throw(env, make_errno_error(env, err, "posix_fadvise"));
    return NULL;
  }
  return NULL;
}

/*
 * keepHeapMemory(mmapThreshold, trimThreshold) -> whether the allocator took them.
 * glibc hands memory it frees back to the kernel (munmap of large blocks, trimming
 * the heap's top), and on the VMs blockgate runs on each page faulted back in later
 * costs about 16 us: a 2 MiB reply slab re-faulted 512 times. Raising both
 * thresholds keeps freed buffers in the process for the next request.
 */
static napi_value js_keep_heap_memory(napi_env env, napi_callback_info info) {
  napi_value argv[2], result;
  int64_t mmap_threshold, trim_threshold;
  bool ok = false;
  if (!get_args(env, info, 2, argv)) return NULL;
  if (!get_i64(env, argv[0], &mmap_threshold, "mmapThreshold") ||
      !get_i64(env, argv[1], &trim_threshold, "trimThreshold"))
    return NULL;
#ifdef __GLIBC__
  ok = mallopt(M_MMAP_THRESHOLD, (int)(mmap_threshold > 0x7fffffff ? 0x7fffffff : mmap_threshold)) == 1 &&
       mallopt(M_TRIM_THRESHOLD, (int)(trim_threshold > 0x7fffffff ? 0x7fffffff : trim_threshold)) == 1;
#endif
  CHECK(napi_get_boolean(env, ok, &result));
  return result;
}

/*
 * dropFileMappings(path) -> bytes: madvise(MADV_DONTNEED) on every mapping of
 * the file `path` (absolute, as /proc/self/maps names it) in this process.
 * The index's memory map stays resident page by page as the B-trees move
 * under copy-on-write, so the process's RSS grows towards the file's size
 * though few of those pages are in use. For a shared file mapping the call
 * loses nothing: the pages stay in the page cache and the next access maps
 * them again with a minor fault.
 */
static napi_value js_drop_file_mappings(napi_env env, napi_callback_info info) {
  napi_value argv[1], result;
  char want[4096];
  size_t want_len;
  if (!get_args(env, info, 1, argv)) return NULL;
  if (napi_get_value_string_utf8(env, argv[0], want, sizeof want, &want_len) != napi_ok ||
      want_len == 0 || want_len >= sizeof want - 1) {
    napi_throw_type_error(env, NULL, "path must be a non-empty string");
    return NULL;
  }
  FILE *maps = fopen("/proc/self/maps", "re");
  if (!maps) {
    napi_throw(env, make_errno_error(env, errno, "open /proc/self/maps"));
    return NULL;
  }
  char line[4096 + 256];
  uint64_t dropped = 0;
  int err = 0;
  while (fgets(line, sizeof line, maps)) {
    unsigned long start, end;
    int name_at = 0;
    if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %n", &start, &end, &name_at) < 2 || name_at == 0) continue;
    char *name = line + name_at;
    name[strcspn(name, "\n")] = 0;
    if (strcmp(name, want) != 0) continue;
    if (madvise((void *)start, end - start, MADV_DONTNEED) != 0) {
      err = errno;
      break;
    }
    dropped += end - start;
  }
  fclose(maps);
  if (err) {
    napi_throw(env, make_errno_error(env, err, "madvise"));
    return NULL;
  }
  CHECK(napi_create_double(env, (double)dropped, &result));
  return result;
}

/* blockDeviceSize(fd) -> number of bytes of a block device. */
static napi_value js_block_device_size(napi_env env, napi_callback_info info) {
  napi_value argv[1], result;
  int64_t fd;
  uint64_t size = 0;
  if (!get_args(env, info, 1, argv)) return NULL;
  if (!get_i64(env, argv[0], &fd, "fd")) return NULL;
  if (ioctl((int)fd, BLKGETSIZE64, &size) < 0) {
    napi_throw(env, make_errno_error(env, errno, "ioctl(BLKGETSIZE64)"));
    return NULL;
  }
  CHECK(napi_create_int64(env, (int64_t)size, &result));
  return result;
}

/* peerCredentials(fd) -> { pid, uid, gid } of the process at the other end of a Unix socket. */
static napi_value js_peer_credentials(napi_env env, napi_callback_info info) {
  napi_value argv[1], result, v;
  int64_t fd;
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (!get_args(env, info, 1, argv)) return NULL;
  if (!get_i64(env, argv[0], &fd, "fd")) return NULL;
  if (getsockopt((int)fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
    napi_throw(env, make_errno_error(env, errno, "getsockopt(SO_PEERCRED)"));
    return NULL;
  }
  CHECK(napi_create_object(env, &result));
  CHECK(napi_create_int32(env, cred.pid, &v));
  CHECK(napi_set_named_property(env, result, "pid", v));
  CHECK(napi_create_uint32(env, cred.uid, &v));
  CHECK(napi_set_named_property(env, result, "uid", v));
  CHECK(napi_create_uint32(env, cred.gid, &v));
  CHECK(napi_set_named_property(env, result, "gid", v));
  return result;
}

/*
 * sendBuffer(fd, bytes) -> the socket's send buffer after asking for `bytes` (SO_SNDBUF;
 * the kernel caps the request at net.core.wmem_max and reports double what it keeps).
 */
static napi_value js_send_buffer(napi_env env, napi_callback_info info) {
  napi_value argv[2], result;
  int64_t fd, bytes;
  if (!get_args(env, info, 2, argv)) return NULL;
  if (!get_i64(env, argv[0], &fd, "fd") || !get_i64(env, argv[1], &bytes, "bytes")) return NULL;
  int v = bytes > 0x7fffffff ? 0x7fffffff : (int)bytes;
  socklen_t len = sizeof v;
  if (setsockopt((int)fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v) < 0 ||
      getsockopt((int)fd, SOL_SOCKET, SO_SNDBUF, &v, &len) < 0) {
    napi_throw(env, make_errno_error(env, errno, "setsockopt(SO_SNDBUF)"));
    return NULL;
  }
  CHECK(napi_create_int64(env, v, &result));
  return result;
}

/* A string argument, copied into a malloc'd buffer (NULL, with a TypeError thrown, if it is not one). */
static char *dup_string(napi_env env, napi_value v) {
  size_t len = 0;
  char *out;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected a string");
    return NULL;
  }
  out = malloc(len + 1);
  if (!out) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  napi_get_value_string_utf8(env, v, out, len + 1, &len);
  return out;
}

/*
 * reexec(path, args): execv(path, args), the process id kept. Returns only on failure,
 * by throwing the errno error, with everything as it was. libuv opens stdio
 * close-on-exec, so that flag is cleared for the new program to inherit fds 0-2 as a
 * shell would hand them on; their other flags (shared with the parent) are left alone.
 */
static napi_value js_reexec(napi_env env, napi_callback_info info) {
  napi_value argv[2], item;
  uint32_t n = 0, i;
  bool is_array = false;
  char *path, **args;
  int err, fd, fdflags[3];
  if (!get_args(env, info, 2, argv)) return NULL;
  if (napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array ||
      napi_get_array_length(env, argv[1], &n) != napi_ok || n == 0) {
    napi_throw_type_error(env, NULL, "args must be a non-empty array of strings");
    return NULL;
  }
  path = dup_string(env, argv[0]);
  if (!path) return NULL;
  args = calloc((size_t)n + 1, sizeof *args);
  if (!args) {
    free(path);
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  for (i = 0; i < n; i++) {
    if (napi_get_element(env, argv[1], i, &item) != napi_ok) {
      napi_throw_type_error(env, NULL, "args must be a non-empty array of strings");
      break;
    }
    if (!(args[i] = dup_string(env, item))) break;
  }
  if (i == n) {
    for (fd = 0; fd <= 2; fd++) {
      fdflags[fd] = fcntl(fd, F_GETFD);
      if (fdflags[fd] >= 0) fcntl(fd, F_SETFD, fdflags[fd] & ~FD_CLOEXEC);
    }
    execv(path, args);
    err = errno;
    for (fd = 0; fd <= 2; fd++)
      if (fdflags[fd] >= 0) fcntl(fd, F_SETFD, fdflags[fd]);
    napi_throw(env, make_errno_error(env, err, "execv"));
  }
  for (i = 0; i < n; i++) free(args[i]);
  free(args);
  free(path);
  return NULL;
}

/*
 * throughputThread() -> whether the calling thread now runs under SCHED_BATCH: for
 * worker threads (the index writer, the encoding pool), whose work is throughput as the
 * libuv pool's is (pool_thread_policy above).
 */
static napi_value js_throughput_thread(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value result;
  CHECK(napi_get_boolean(env, throughput_policy(), &result));
  return result;
}

static napi_value set_int(napi_env env, napi_value obj, const char *name, int64_t value) {
  napi_value v;
  CHECK(napi_create_int64(env, value, &v));
  CHECK(napi_set_named_property(env, obj, name, v));
  return obj;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"fallocate", NULL, js_fallocate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seek", NULL, js_seek, NULL, NULL, NULL, napi_enumerable, NULL},
      {"readNoWait", NULL, js_read_no_wait, NULL, NULL, NULL, napi_enumerable, NULL},
      {"writeNoWait", NULL, js_write_no_wait, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ioBatch", NULL, js_io_batch, NULL, NULL, NULL, napi_enumerable, NULL},
      {"lz4Compress", NULL, js_lz4_compress, NULL, NULL, NULL, napi_enumerable, NULL},
      {"lz4Decompress", NULL, js_lz4_decompress, NULL, NULL, NULL, napi_enumerable, NULL},
      {"hash128Into", NULL, js_hash128_into, NULL, NULL, NULL, napi_enumerable, NULL},
      {"hashBlocks", NULL, js_hash_blocks, NULL, NULL, NULL, napi_enumerable, NULL},
      {"decodeRecord", NULL, js_decode_record, NULL, NULL, NULL, napi_enumerable, NULL},
      {"decodeRecords", NULL, js_decode_records, NULL, NULL, NULL, napi_enumerable, NULL},
      {"encodeRecords", NULL, js_encode_records, NULL, NULL, NULL, napi_enumerable, NULL},
      {"willNeed", NULL, js_will_need, NULL, NULL, NULL, napi_enumerable, NULL},
      {"dropFileMappings", NULL, js_drop_file_mappings, NULL, NULL, NULL, napi_enumerable, NULL},
      {"keepHeapMemory", NULL, js_keep_heap_memory, NULL, NULL, NULL, napi_enumerable, NULL},
      {"blockDeviceSize", NULL, js_block_device_size, NULL, NULL, NULL, napi_enumerable, NULL},
      {"peerCredentials", NULL, js_peer_credentials, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sendBuffer", NULL, js_send_buffer, NULL, NULL, NULL, napi_enumerable, NULL},
      {"reexec", NULL, js_reexec, NULL, NULL, NULL, napi_enumerable, NULL},
      {"throughputThread", NULL, js_throughput_thread, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  CHECK(napi_define_properties(env, exports, sizeof props / sizeof props[0], props));
  if (!set_int(env, exports, "FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE)) return NULL;
  if (!set_int(env, exports, "FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE)) return NULL;
  if (!set_int(env, exports, "FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE)) return NULL;
  if (!set_int(env, exports, "SEEK_DATA", SEEK_DATA)) return NULL;
  if (!set_int(env, exports, "SEEK_HOLE", SEEK_HOLE)) return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
