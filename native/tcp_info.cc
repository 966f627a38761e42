// A snapshot of a TCP socket's kernel state, used to check a handed-over connection (is it ESTABLISHED, is the
// peer still acking?) before trusting it.
//
// Man pages: tcp(7) (TCP_INFO), getsockopt(2).
// Header: <linux/tcp.h> for struct tcp_info, because glibc's <netinet/tcp.h> copy stops at tcpi_total_retrans.
// The two headers cannot be included together, and <uv.h> pulls in <netinet/tcp.h>, so this file must not
// include uv.h (nor binding.h): that is why TCP_INFO lives in a file of its own.
#include "tcp_info.h"

#include <linux/tcp.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cerrno>

#include "errors.h"
#include "fd.h"

namespace fdferry {

namespace {

Napi::Value TcpInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArgument(info, 0);
  // Zeroed first: an older kernel fills only a prefix of the struct (it reports how much in `length`), and the
  // fields it does not know then read as 0 instead of garbage.
  struct tcp_info ti = {};
  socklen_t length = sizeof ti;
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &length) < 0) throw ErrnoException(env, errno, "getsockopt");

  Napi::Object r = Napi::Object::New(env);
  // 64-bit counters become doubles: exact up to 2^53, which byte counters do not reach in practice.
  auto set = [&](const char* name, double value) { r.Set(name, Napi::Number::New(env, value)); };
  set("state", ti.tcpi_state);
  set("caState", ti.tcpi_ca_state);
  set("retransmits", ti.tcpi_retransmits);
  set("probes", ti.tcpi_probes);
  set("backoff", ti.tcpi_backoff);
  set("options", ti.tcpi_options);
  set("sndWscale", ti.tcpi_snd_wscale);
  set("rcvWscale", ti.tcpi_rcv_wscale);
  set("rto", ti.tcpi_rto);
  set("ato", ti.tcpi_ato);
  set("sndMss", ti.tcpi_snd_mss);
  set("rcvMss", ti.tcpi_rcv_mss);
  set("unacked", ti.tcpi_unacked);
  set("sacked", ti.tcpi_sacked);
  set("lost", ti.tcpi_lost);
  set("retrans", ti.tcpi_retrans);
  set("lastDataSent", ti.tcpi_last_data_sent);
  set("lastDataRecv", ti.tcpi_last_data_recv);
  set("lastAckRecv", ti.tcpi_last_ack_recv);
  set("pmtu", ti.tcpi_pmtu);
  set("rcvSsthresh", ti.tcpi_rcv_ssthresh);
  set("rtt", ti.tcpi_rtt);
  set("rttvar", ti.tcpi_rttvar);
  set("sndSsthresh", ti.tcpi_snd_ssthresh);
  set("sndCwnd", ti.tcpi_snd_cwnd);
  set("advmss", ti.tcpi_advmss);
  set("reordering", ti.tcpi_reordering);
  set("rcvRtt", ti.tcpi_rcv_rtt);
  set("rcvSpace", ti.tcpi_rcv_space);
  set("totalRetrans", ti.tcpi_total_retrans);
  set("bytesAcked", static_cast<double>(ti.tcpi_bytes_acked));
  set("bytesReceived", static_cast<double>(ti.tcpi_bytes_received));
  set("segsOut", ti.tcpi_segs_out);
  set("segsIn", ti.tcpi_segs_in);
  set("minRtt", ti.tcpi_min_rtt);
  set("dataSegsIn", ti.tcpi_data_segs_in);
  set("dataSegsOut", ti.tcpi_data_segs_out);
  set("deliveryRate", static_cast<double>(ti.tcpi_delivery_rate));
  set("busyTime", static_cast<double>(ti.tcpi_busy_time));
  set("bytesSent", static_cast<double>(ti.tcpi_bytes_sent));
  set("bytesRetrans", static_cast<double>(ti.tcpi_bytes_retrans));
  return r;
}

}  // namespace

void InitTcpInfo(Napi::Env env, Napi::Object exports) {
  exports.Set("tcpInfo", Napi::Function::New(env, TcpInfo, "tcpInfo"));
}

}  // namespace fdferry
