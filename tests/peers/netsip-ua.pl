#!/usr/bin/perl
# A SIP user agent built on Net::SIP (libnet-sip-perl), driven by smsgw's black-box tests.
#
#   netsip-ua.pl register USER PASSWORD DOMAIN REGISTRAR_HOST:PORT LOCAL_HOST:PORT EXPIRES [udp|tcp]
#
# Prints "REGISTER ok code=200 contacts=N" or "REGISTER failed code=NNN" and exits 0 or 1.
use strict;
use warnings;
use Net::SIP;

my ($cmd, $user, $password, $domain, $registrar, $local, $expires, $proto) = @ARGV;
die "usage: $0 register USER PASSWORD DOMAIN REGISTRAR LOCAL EXPIRES [udp|tcp]\n"
    unless defined $expires && $cmd eq 'register';
$proto ||= 'udp';

my $leg = Net::SIP::Leg->new(addr => $local, proto => $proto)
    or die "cannot create a $proto leg on $local: $!\n";
my $ua = Net::SIP::Simple->new(
    legs      => [$leg],
    registrar => "sip:$registrar;transport=$proto",
    from      => "sip:$user\@$domain",
    auth      => [$user, $password],
);

my ($status, %info);
$ua->register(
    expires  => $expires,
    cb_final => sub { ($status, %info) = @_ },
);
$ua->loop(10, \$status);

my $code = $info{code} // ($info{packet} ? $info{packet}->code : 'none');
if (($status // '') eq 'OK') {
    my @contacts = $info{packet}->get_header('contact');
    printf "REGISTER ok code=%s contacts=%d\n", $info{packet}->code, scalar @contacts;
    exit 0;
}
print "REGISTER failed code=$code\n";
exit 1;
