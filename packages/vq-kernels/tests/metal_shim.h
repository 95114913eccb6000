// Just enough of the Metal Shading Language, as C++, to syntax-check the Metal sources on Linux.
#include <cmath>
#include <cstdint>
#define device
#define threadgroup
#define thread
#define constant
#define kernel
typedef unsigned int uint;
typedef unsigned long ulong;
typedef unsigned short ushort;
struct half {
  float v;
  half() : v(0) {}
  half(float x) : v(x) {}
  operator float() const { return v; }
};
struct uint3 { uint x, y, z; };
enum class mem_flags { mem_threadgroup, mem_device };
typedef int atomic_int;
enum memory_order { memory_order_relaxed };
template <class T, class S> T as_type(S x) { T t; __builtin_memcpy(&t, &x, sizeof(T)); return t; }
namespace metal {
inline float exp2(float x) { return std::exp2(x); }
inline float log2(float x) { return std::log2(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float fabs(float x) { return std::fabs(x); }
inline float fmax(float a, float b) { return std::fmax(a, b); }
template <class T> T min(T a, T b) { return a < b ? a : b; }
template <class T> T max(T a, T b) { return a > b ? a : b; }
inline uint popcount(uint x) { return __builtin_popcount(x); }
inline float simd_shuffle_xor(float v, ushort) { return v; }
inline float simd_shuffle(float v, ushort) { return v; }
inline uint simd_shuffle(uint v, ushort) { return v; }
inline void threadgroup_barrier(mem_flags) {}
inline int atomic_fetch_add_explicit(atomic_int* p, int v, memory_order) { int o = *p; *p += v; return o; }
inline void atomic_store_explicit(atomic_int* p, int v, memory_order) { *p = v; }
}  // namespace metal
