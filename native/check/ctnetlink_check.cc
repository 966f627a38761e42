// A standalone check of native/ctnetlink.h against the reservation sample of notes/fish-kernel.md §7, which a
// 6.18 kernel accepted: the encoder must reproduce those 168 bytes exactly. Built and run by
// test/integration/ctnetlink-sample.test.ts with the system C++ compiler (no addon, no root needed).
#include <arpa/inet.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "../ctnetlink.h"

namespace ct = fdferry::ctnetlink;

int main() {
  const char* expected_hex =
      "a8000000" "0001" "0506" "34120000" "00000000" "02000000"
      "34000180" "14000180" "08000100" "cb007107" "08000200" "c6336402"
      "1c000280" "05000100" "06000000" "06000200" "9c410000" "06000300" "00070000"
      "34000280" "14000180" "08000100" "c6336402" "08000200" "cb007107"
      "1c000280" "05000100" "06000000" "06000200" "00070000" "06000300" "9c410000"
      "08000700" "0000003c" "08000300" "00000008" "08000800" "f15e0001"
      "14001600" "00000001" "c92e0104" "64400002" "00000000";
  ct::Reservation r;
  r.orig.family = 4;
  r.orig.protocol = 6;
  inet_pton(AF_INET, "203.0.113.7", r.orig.src);
  inet_pton(AF_INET, "198.51.100.2", r.orig.dst);
  r.orig.sport = 40001;
  r.orig.dport = 7;
  r.timeout_s = 60;
  r.mark = 0xf15e0001;
  r.rid = 1;
  r.client_port = 51502;
  inet_pton(AF_INET, "100.64.0.2", r.client);
  uint8_t out[ct::kMaxMessage];
  r.status = ct::kStatusConfirmed;  // as in the sample; the pump's default adds ASSURED
  size_t length = ct::BuildReservation(out, 0x1234, r);
  std::string hex;
  char byte[3];
  for (size_t i = 0; i < length; i++) {
    std::snprintf(byte, sizeof byte, "%02x", out[i]);
    hex += byte;
  }
  std::string expected(expected_hex);
  if (length != 168 || hex != expected) {
    std::printf("not ok - reservation differs from the sample\n  got      %s\n  expected %s\n", hex.c_str(),
                expected.c_str());
    return 1;
  }
  std::printf("ok - the reservation sample of notes §7, byte for byte\n");

  // The answers: an ack for another sequence number is ignored, ours is read.
  uint8_t ack[2 * 36] = {};
  auto put = [&](uint8_t* at, uint32_t seq, int32_t err) {
    uint32_t len = 36;
    uint16_t type = ct::kNlmsgError;
    std::memcpy(at, &len, 4);
    std::memcpy(at + 4, &type, 2);
    std::memcpy(at + 8, &seq, 4);
    std::memcpy(at + 16, &err, 4);
  };
  put(ack, 7, 0);
  put(ack + 36, 8, -17);
  ct::Answer answer;
  ct::ReadAnswer(ack, sizeof ack, 8, &answer);
  if (!answer.acked || answer.error != 17) {
    std::printf("not ok - EEXIST ack not read\n");
    return 1;
  }
  r.status = ct::kStatusConfirmed | ct::kStatusAssured;
  length = ct::BuildReservation(out, 0x1234, r);
  if (length != 168 || out[20 + 52 + 52 + 8 + 7] != 0x0c) {
    std::printf("not ok - the default STATUS is not CONFIRMED|ASSURED\n");
    return 1;
  }
  std::printf("ok - the default STATUS is CONFIRMED|ASSURED\n");
  std::printf("ok - acks are matched by sequence number\n");
  return 0;
}
