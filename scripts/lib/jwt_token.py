"""Prints an RS256 JWT signed with a PEM private key, for the benchmarks: no JWT library, the
signature comes from `openssl dgst`. Usage: jwt_token.py KEY.pem KID SUB ISS AUD [SECONDS]"""
import base64, json, subprocess, sys, time

key, kid, sub, iss, aud = sys.argv[1:6]
ttl = int(sys.argv[6]) if len(sys.argv) > 6 else 3600
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode())
claims = b64(json.dumps({"sub": sub, "iss": iss, "aud": aud, "exp": int(time.time()) + ttl}).encode())
signing_input = f"{header}.{claims}".encode()
sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing_input,
                     capture_output=True, check=True).stdout
print(f"{header}.{claims}.{b64(sig)}")
