#!/bin/bash
# Configure / control the benchmark postfix instance (Debian's default instance, /etc/postfix).
# A copy of ../shared/bench/postfix_bench.sh, so the benchmark runs from a clean clone.
#   postfix_bench.sh install   apt-get install postfix (No configuration)
#   postfix_bench.sh setup     write main.cf/master.cf: smtpd ONLY on 127.0.0.1:10025,
#                              relayhost [127.0.0.1]:10026, no local delivery, no DNS
#   postfix_bench.sh start|stop|flush|status
# Ports overridable: PF_IN_PORT (10025) PF_OUT_PORT (10026).
set -euo pipefail
IN=${PF_IN_PORT:-10025}
OUT=${PF_OUT_PORT:-10026}

case "${1:-}" in
install)
    apt-get update -q
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix
    ;;
setup)
    # fresh main.cf (Debian "No configuration" installs none); keep a backup of any foreign one
    if [ -f /etc/postfix/main.cf ] && ! grep -q '^# smtpgate-bench' /etc/postfix/main.cf; then
        cp -a /etc/postfix/main.cf /etc/postfix/main.cf.pre-bench.$(date +%s)
    fi
    echo "# smtpgate-bench instance (benchmarks/postfix_bench.sh)" > /etc/postfix/main.cf
    postconf -e \
        "compatibility_level = 3.6" \
        "myhostname = smtpgate-bench.localdomain" \
        "mydomain = localdomain" \
        "myorigin = \$myhostname" \
        "inet_interfaces = loopback-only" \
        "inet_protocols = ipv4" \
        "mynetworks = 127.0.0.0/8" \
        "mydestination =" \
        "local_recipient_maps =" \
        "local_transport = error:5.1.1 local delivery disabled" \
        "alias_maps =" "alias_database =" \
        "relay_domains =" \
        "relayhost = [127.0.0.1]:$OUT" \
        "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination" \
        "smtpd_peername_lookup = no" \
        "disable_dns_lookups = yes" \
        "smtp_host_lookup = native" \
        "smtp_tls_security_level = none" "smtpd_tls_security_level = none" \
        "biff = no" "append_dot_mydomain = no" \
        "maillog_file = /var/log/postfix-bench.log" \
        "message_size_limit = 10240000"
    # master.cf: remove the port-25 listener, add loopback-only listener on $IN, no chroot
    postconf -MX smtp/inet 2>/dev/null || true
    postconf -M "127.0.0.1:$IN/inet=127.0.0.1:$IN inet n - n - - smtpd"
    postconf -F '*/*/chroot = n'
    postconf -M postlog/unix-dgram="postlog unix-dgram n - n - 1 postlogd" 2>/dev/null || true
    postfix check
    echo "postfix configured: in=127.0.0.1:$IN relayhost=[127.0.0.1]:$OUT"
    ;;
start)  postfix start ;;
stop)   postfix stop || true ;;
flush)  postsuper -d ALL >/dev/null 2>&1 || true ;;
status) postfix status || true; ss -ltnp | grep -E "master|smtpd" || true ;;
*) echo "usage: $0 install|setup|start|stop|flush|status" >&2; exit 2 ;;
esac
